"""The runtime, the package's top level and `gemma_export.load` import and generate with
torch made unimportable: a deployment image has onnxruntime, numpy and sentencepiece, not
torch. And `import gemma_export` alone loads none of the heavy packages."""

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
    import gemma_export
    import gemma_export.runtime
    import gemma_export.runtime.session, gemma_export.runtime.generate, gemma_export.runtime.tokenizer
    import gemma_export.runtime.manifest
    from gemma_export.runtime.generate import SamplingConfig, load_generator
    gen = load_generator(sys.argv[1], provider="cpu")
    res = gen.generate_result(["Hello"], SamplingConfig(max_new_tokens=8, ignore_eos=True))
    # the Python API's torch-free half: the package's top level, load, generate, stream
    api = gemma_export.load(gemma_export.Artifact.open(sys.argv[1]), provider="cpu")
    text = api.generate("Hello", max_new_tokens=8, ignore_eos=True)
    streamed = "".join(api.stream("Hello", max_new_tokens=8, ignore_eos=True))
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers", "onnx"})
    print(json.dumps({"tokens": res.token_ids[0], "text": res.texts[0], "api": [text, streamed], "heavy": heavy}))
    """
)

# `import gemma_export` alone: no torch, and not even ONNX Runtime or numpy (load imports them).
IMPORT_ONLY = textwrap.dedent(
    """
    import json, sys
    import gemma_export
    names = {"torch", "transformers", "onnx", "onnxruntime", "numpy", "sentencepiece"}
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in names)))
    """
)


def test_runtime_runs_without_torch(tiny_artifacts):
    out, _ = tiny_artifacts["tiny-gemma1"]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res["tokens"]) == 8
    assert res["api"] == [res["text"], res["text"]]
    assert res["heavy"] == []


def test_importing_the_package_is_cheap():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_block_is_effective():
    """The blocker really blocks (so the test above cannot pass vacuously)."""
    probe = SCRIPT.split("import gemma_export\n")[0] + "import torch\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "blocked" in proc.stderr
