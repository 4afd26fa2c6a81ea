"""The other runtimes, installed (or found cached) once per session by scripts/peer_clients.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="session")
def peers() -> dict[str, str]:
    """Install (or find, cached) the clients; fail with the installer's reason otherwise."""
    p = subprocess.run(["bash", str(REPO / "scripts" / "peer_clients.sh")], capture_output=True, text=True,
                       env={**os.environ, "PROJECT_PY": sys.executable})
    if p.returncode != 0:
        pytest.fail(f"scripts/peer_clients.sh failed: {p.stderr.strip().splitlines()[-1:]}", pytrace=False)
    return dict(line.split("=", 1) for line in p.stdout.split())
