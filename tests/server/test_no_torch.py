"""The server imports and serves with torch made unimportable (the Docker image has no
torch): the app over the engine answers a completion in-process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.runtime.test_no_torch import SCRIPT

BLOCK = SCRIPT.split("import gemma_export.runtime")[0]

SERVE = BLOCK + textwrap.dedent(
    """
    import gemma_export.server.engine, gemma_export.server.http, gemma_export.server.metrics
    import gemma_export.server.openai_schema, gemma_export.server.main
    import gemma_export.cli
    from starlette.testclient import TestClient
    from gemma_export.server.http import Settings, create_app
    from gemma_export.server.main import ServeOptions, loader
    from pathlib import Path
    import time
    app = create_app(loader(Path(sys.argv[1]), ServeOptions()), Settings(model_name="m"))
    with TestClient(app) as c:
        t0 = time.monotonic()
        while c.get("/health").status_code != 200:
            assert time.monotonic() - t0 < 60
            time.sleep(0.1)
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "ignore_eos": True}).json()
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers", "onnx"})
    print(json.dumps({"tokens": r["usage"]["completion_tokens"], "heavy": heavy}))
    """
)


def test_server_runs_without_torch(tiny_fp32):
    proc = subprocess.run([sys.executable, "-c", SERVE, str(tiny_fp32)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"tokens": 3, "heavy": []}
