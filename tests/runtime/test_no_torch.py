"""The runtime imports and generates with torch made unimportable: a deployment image
has onnxruntime, numpy and sentencepiece, not torch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys, json

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "gguf", "safetensors", "onnx", "onnxscript"}:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Block())
    import gemma_export.runtime
    import gemma_export.runtime.session, gemma_export.runtime.generate, gemma_export.runtime.tokenizer
    import gemma_export.runtime.manifest
    from gemma_export.runtime.generate import SamplingConfig, load_generator
    gen = load_generator(sys.argv[1], provider="cpu")
    res = gen.generate(["Hello"], SamplingConfig(max_new_tokens=8, ignore_eos=True))
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers", "onnx"})
    print(json.dumps({"tokens": res.token_ids[0], "heavy": heavy}))
    """
)


def test_runtime_runs_without_torch(tiny_artifacts):
    out, _ = tiny_artifacts["tiny-gemma1"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["tokens"]) == 8
    assert res["heavy"] == []


def test_block_is_effective():
    """The blocker really blocks (so the test above cannot pass vacuously)."""
    probe = SCRIPT.split("import gemma_export.runtime")[0] + "import torch\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "blocked" in proc.stderr
