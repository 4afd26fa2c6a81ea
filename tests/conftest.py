"""Shared fixtures. Expensive things happen once per test session: the real Gemma 3 270M
is loaded once, exported once (fp32, verified), and the transformers oracle for it is
built once; tiny presets are exported once per family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY = ("tiny-gemma1", "tiny-gemma2", "tiny-gemma3")

# Tests run with few threads: the machine has 2 cores and numbers must not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Fixtures that export and verify artifacts (tens of seconds each on 2 cores): a test that
# uses one is `slow`, so `make test-fast` (-m "not real and not slow") runs without them.
SLOW_FIXTURES = {"tiny_artifacts", "gemma4_artifacts", "plain", "tiny_fp32", "tiny_int8", "server", "client",
                 "exported"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    from gemma_export.models.load import bundled_gguf_path

    return bundled_gguf_path()


@pytest.fixture(scope="session")
def real_ckpt():
    from gemma_export.models.load import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def hf_real(real_gguf):
    """transformers' own GGUF loading of the same file: the independent oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(real_gguf.parent), gguf_file=real_gguf.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(str(real_gguf.parent), gguf_file=real_gguf.name)
    return model, tok


@pytest.fixture(scope="session")
def real_artifact(tmp_path_factory, real_ckpt):
    """The real 270M exported (fp32) and verified once for the whole session."""
    from gemma_export.exporter import pipeline
    from gemma_export.models import load

    out = tmp_path_factory.mktemp("real") / "gemma3-270m-fp32"
    # Reuse the session's loaded checkpoint instead of loading it a second time.
    orig = load.load_model
    pipeline.load_model = lambda spec: real_ckpt if spec is None else orig(spec)
    try:
        result = pipeline.export_artifact(None, out)
    finally:
        pipeline.load_model = orig
    return out, result


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """Each tiny preset exported and verified once: {name: (dir, result)}."""
    from gemma_export.exporter.pipeline import export_artifact

    root = tmp_path_factory.mktemp("tiny")
    return {name: (root / name, export_artifact(name, root / name)) for name in TINY}
