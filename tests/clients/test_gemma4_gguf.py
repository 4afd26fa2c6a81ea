"""Gemma 4 GGUF files as llama.cpp writes them load, export and carry their blocks here.

The files come from llama.cpp's own converter (convert_hf_to_gguf.py, fetched by
scripts/peer_clients.sh and run from its source tree as its README says), run on the tiny
Gemma 4 presets saved as Hugging Face checkpoints (their shipped trained weights, the presets'
byte-level tokenizer): the dense preset (per-layer embeddings, kv-shared layers without k / v, double-wide
MLPs, wider global heads, proportional RoPE) and the MoE preset (k = v and fewer kv heads on
global layers, router and experts). The oracle is transformers on the same checkpoint folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.models.test_gemma4 import hf_twin, ragged

pytestmark = pytest.mark.slow

TINY4 = ("tiny-gemma4", "tiny-gemma4-moe")


def _hf_dir(name: str, d: Path) -> Path:
    """The preset as a Hugging Face checkpoint folder: config, safetensors, tokenizer files."""
    from gemma_export.exporter import hf_tokenizer, tokenizer_source
    from gemma_export.models.load import load_model

    model = load_model(name).model
    hf_twin(model).save_pretrained(d)
    cfg = model.config
    tok = tokenizer_source.preset_tokenizer(cfg.vocab_size, cfg.family)
    (d / "tokenizer.model").write_bytes(tok)
    files = {"tokenizer.json": hf_tokenizer.tokenizer_json(tok),
             "tokenizer_config.json": hf_tokenizer.tokenizer_config(tok, cfg.max_position_embeddings, cfg.family),
             "special_tokens_map.json": hf_tokenizer.special_tokens_map(tok, cfg.family)}
    for fname, obj in files.items():
        (d / fname).write_text(json.dumps(obj))
    return d


_CONVERTED: dict[tuple[str, str], tuple[Path, Path]] = {}


@pytest.fixture
def converted(peers, tmp_path_factory):
    """converted(preset, outtype) -> (HF folder, the GGUF llama.cpp's converter wrote from it)."""

    def _convert(name: str, outtype: str) -> tuple[Path, Path]:
        if (name, outtype) not in _CONVERTED:
            root = tmp_path_factory.mktemp(f"{name}-{outtype}")
            hf = _hf_dir(name, root / "hf")
            out = root / f"{name}-{outtype}.gguf"
            conv = Path(peers["llamacpp_convert"])
            p = subprocess.run([sys.executable, "convert_hf_to_gguf.py", str(hf), "--outfile", str(out),
                                "--outtype", outtype], cwd=conv, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(conv / "gguf-py")})
            assert p.returncode == 0, p.stderr[-2000:]
            _CONVERTED[name, outtype] = (hf, out)
        return _CONVERTED[name, outtype]

    return _convert


@pytest.mark.parametrize("name", TINY4)
def test_llama_cpp_gguf_loads_to_transformers_logits(converted, name):
    """The f32 GGUF gives the config the checkpoint's config.json gives, and logits equal to
    transformers' on the checkpoint (left-padded ragged batch past the window of 8)."""
    from transformers import AutoModelForCausalLM

    from gemma_export.models.config import GemmaConfig
    from gemma_export.models.load import load_model

    hf_path, gguf = converted(name, "f32")
    ckpt = load_model(str(gguf))
    want = GemmaConfig.from_hf_file(hf_path / "config.json").to_dict()
    got = ckpt.config.to_dict()
    assert got["rms_norm_eps"] == pytest.approx(want["rms_norm_eps"], rel=1e-6)  # stored as float32
    ignore = {"name", "rms_norm_eps"}
    assert {k: v for k, v in got.items() if k not in ignore} == {k: v for k, v in want.items() if k not in ignore}
    hf = AutoModelForCausalLM.from_pretrained(hf_path, attn_implementation="eager").eval()
    ids, mask, pos = ragged(ckpt.config)
    with torch.no_grad():
        ours_logits, _ = ckpt.model(ids, mask, pos, ckpt.model.empty_cache(ids.shape[0]))
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (ours_logits[real] - ref[real]).abs().max().item() <= 1e-4


def test_llama_cpp_gguf_tokenizer_encodes_as_the_checkpoints(converted):
    """The SentencePiece model rebuilt from the GGUF's gemma4 vocabulary (tokens and merges)
    gives the ids the preset's own tokenizer.model gives, on the tokenizer tests' texts. Not
    the markup text: the converter types `<unusedN>` as normal pieces (they sit in
    tokenizer.json's vocabulary), so spelled out in text they split as llama.cpp splits them,
    where the preset's SentencePiece model matches them whole."""
    from gemma_export.exporter.tokenizer_source import tokenizer_from_gguf
    from gemma_export.runtime.tokenizer import Tokenizer
    from tests.runtime.test_tokenizer import CORPUS

    hf_path, gguf = converted("tiny-gemma4", "f32")
    want = Tokenizer.from_file(hf_path / "tokenizer.model")
    got = Tokenizer.from_bytes(tokenizer_from_gguf(gguf))
    texts = {k: v for k, v in CORPUS.items() if k != "markup_tokens"}
    assert len(texts) >= 20
    assert {k: got.encode(v) for k, v in texts.items()} == {k: want.encode(v) for k, v in texts.items()}


def test_llama_cpp_gguf_exports_and_verifies(converted, tmp_path):
    """`export` of the converted f32 GGUF (the dense preset) writes an artifact that passes
    parity against the model loaded from that GGUF."""
    from gemma_export.exporter.pipeline import export_artifact

    _, gguf = converted("tiny-gemma4", "f32")
    out = export_artifact(str(gguf), tmp_path / "fp32")
    assert out["parity"]["passed"] and out["precision"] == "fp32"


@pytest.mark.parametrize("name", TINY4)
def test_gguf_recipe_carries_llama_cpp_q8_0_blocks(converted, tmp_path, name):
    """--precision gguf on the q8_0 file: every product, the per-layer table included, takes
    the file's 8-bit blocks (none rounded again), and at accuracy_level 0 the graph computes
    what the GGUF's dequantized weights compute in our PyTorch model (rel L2 <= 1e-5)."""
    from gemma_export.exporter.pipeline import export_artifact
    from gemma_export.exporter.recipes import RecipeOptions
    from gemma_export.models.load import load_model
    from tests.exporter.test_gemma4_export import graph_vs_model

    _, gguf = converted(name, "q8_0")
    out = tmp_path / "gguf"
    export_artifact(str(gguf), out, precision="gguf", options=RecipeOptions(accuracy_level=0), verify=False)
    manifest = json.loads((out / "manifest.json").read_text())
    bits = manifest["quantized"]["bits"]
    assert bits and all(b == 8 for b, _ in bits.values()), bits
    if name == "tiny-gemma4":
        assert "model.embed_tokens_per_layer.weight" in bits
    rel = graph_vs_model(out, load_model(str(gguf)).model)
    assert rel <= 1e-5, f"relative L2 {rel:.3g}"


@pytest.mark.parametrize("name", TINY4)
def test_gguf_recipe_meets_the_parity_table(converted, tmp_path, name):
    """--precision gguf on the q8_0 file, as a user runs it (int8 activations, outlier
    channels, blocks of 16): the gguf row of the parity table against the model the file
    holds, on the corpus and every held-out domain. The presets' trained weights give their
    logits real margins (models/data/TRAINED.md); random ones would judge flat argmaxes."""
    from gemma_export.exporter.pipeline import export_artifact

    _, gguf = converted(name, "q8_0")
    res = export_artifact(str(gguf), tmp_path / "gguf", precision="gguf")
    assert res["parity"]["passed"], res["parity_table"]
