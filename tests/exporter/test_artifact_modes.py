"""An artifact is a deliverable other users and containers read: its directory and
files take the modes a plain mkdir / open would under the caller's umask (issue 19)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from gemma_export.exporter.pipeline import export_artifact, quantize_artifact


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(d: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(d.stat().st_mode)}
    for p in sorted(d.rglob("*")):
        out[str(p.relative_to(d))] = stat.S_IMODE(p.stat().st_mode)
    return out


def _expected(d: Path, mask: int) -> dict[str, int]:
    return {name: (0o777 if name == "." or (d / name).is_dir() else 0o666) & ~mask for name in _modes(d)}


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_export_follows_the_umask(tmp_path, mask):
    out = tmp_path / "a"
    with umask(mask):
        export_artifact("tiny-gemma1", out, verify=False)
    assert "onnx/model.onnx_data" in _modes(out)
    assert _modes(out) == _expected(out, mask)


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_quantize_follows_the_umask(tiny_artifacts, tmp_path, precision):
    src, _ = tiny_artifacts["tiny-gemma3"]
    out = tmp_path / precision
    with umask(0o022):
        quantize_artifact(src, out, precision=precision, verify=False)
    assert _modes(out) == _expected(out, 0o022)
    data = {"int8": "onnx/model_quantized.onnx_data", "fp16": "onnx/model_fp16.onnx_data"}[precision]
    assert _modes(out)[data] == 0o644 and _modes(out)["."] == 0o755


GENERATE = "from gemma_export.runtime.generate import SamplingConfig, load_generator; import sys, json; " \
           "r = load_generator(sys.argv[1], provider='cpu').generate_result(['Hi'], SamplingConfig(max_new_tokens=4, " \
           "ignore_eos=True)); print(json.dumps(r.token_ids[0]))"


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to act as another user")
def test_another_user_generates_from_an_artifact_root_exported():
    # Outside pytest's tmp_path, whose parents are private to root.
    root = Path(tempfile.mkdtemp(prefix="gemma-export-modes-", dir="/tmp"))
    try:
        root.chmod(0o755)
        out = root / "artifact"
        with umask(0o022):
            export_artifact("tiny-gemma1", out, verify=False)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        env = {**os.environ, "HOME": "/tmp"}
        probe = subprocess.run([*as_nobody, sys.executable, "-c", "import gemma_export.runtime.generate"],
                               capture_output=True, text=True, timeout=60, env=env)
        if probe.returncode != 0:  # the checkout or venv itself is private: not what this test is about
            pytest.skip(f"user 65534 cannot import the package here: {probe.stderr.strip().splitlines()[-1:]}")
        cmd = [sys.executable, "-c", GENERATE, str(out)]
        mine = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert mine.returncode == 0, mine.stderr
        nobody = subprocess.run([*as_nobody, *cmd], capture_output=True, text=True, timeout=120, env=env)
        assert nobody.returncode == 0, nobody.stderr
        assert json.loads(nobody.stdout) == json.loads(mine.stdout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
