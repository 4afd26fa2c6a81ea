"""Server fixtures: one tiny fp32 artifact (Gemma 3: sliding window 8, QK-norm, 256
positions) and its int8 quantization (the shared in-place cache layout), built once."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_fp32(tmp_path_factory):
    from gemma_export.exporter.pipeline import export_artifact

    out = tmp_path_factory.mktemp("serve") / "tiny-gemma3-fp32"
    export_artifact("tiny-gemma3", out, verify=False)
    return out


@pytest.fixture(scope="session")
def tiny_int8(tiny_fp32, tmp_path_factory):
    from gemma_export.exporter.pipeline import quantize_artifact

    out = tmp_path_factory.mktemp("serve") / "tiny-gemma3-int8"
    quantize_artifact(tiny_fp32, out, precision="int8", verify=False)
    return out
