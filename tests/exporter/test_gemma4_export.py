"""Gemma 4 through export, verify, the precision recipes and the runtime, on the tiny
presets (dense with PLE and KV sharing; MoE with k = v). The cache contract is checked
against a copy written here from the config alone: fewer past/present tensors than
layers, each with its layer type's shape, and the KV-shared layers that read it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from gemma_export.errors import ParityError
from gemma_export.exporter.pipeline import export_artifact, quantize_artifact
from gemma_export.exporter.quantize import dequantized_weights
from gemma_export.exporter.recipes import RecipeOptions
from gemma_export.exporter.verify import onnx_teacher_forced, torch_greedy
from gemma_export.models.load import load_model
from gemma_export.runtime.generate import SamplingConfig, load_generator
from gemma_export.runtime.session import DecoderSession

TINY4 = ("tiny-gemma4", "tiny-gemma4-moe")


@pytest.fixture(scope="session")
def gemma4_artifacts(tmp_path_factory):
    """Each tiny Gemma 4 preset exported (fp32) and verified once: {name: (dir, result)}."""
    root = tmp_path_factory.mktemp("gemma4")
    return {name: (root / name, export_artifact(name, root / name)) for name in TINY4}


def _dtype(vi):
    return onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name


def _dims(vi):
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def _contract(cfg: dict) -> tuple[dict, dict]:
    """The Gemma 4 cache contract from the manifest's config, written without contract.py:
    layers before the first KV-shared one own an entry; a shared layer reads the last
    earlier owner of its type; global layers have their own head dim and kv heads."""
    L, types = cfg["num_hidden_layers"], cfg["layer_types"]
    first = L - cfg["num_kv_shared_layers"]
    readers = {i: [i] for i in range(first)}
    for j in range(first, L):
        readers[max(i for i in range(first) if types[i] == types[j])].append(j)
    inputs = {"input_ids": ("int64", ["batch_size", "sequence_length"]),
              "attention_mask": ("int64", ["batch_size", "total_sequence_length"]),
              "position_ids": ("int64", ["batch_size", "sequence_length"])}
    outputs = {"logits": ("float32", ["batch_size", "sequence_length", cfg["vocab_size"]])}
    layers = {}
    for i in range(first):
        glob = types[i] == "full_attention"
        kv = (cfg["num_global_key_value_heads"] if glob and cfg["num_global_key_value_heads"]
              else cfg["num_key_value_heads"])
        hd = cfg["global_head_dim"] if glob and cfg["global_head_dim"] else cfg["head_dim"]
        for t in ("key", "value"):
            inputs[f"past_key_values.{i}.{t}"] = ("float32", ["batch_size", kv, "past_sequence_length", hd])
            outputs[f"present.{i}.{t}"] = ("float32", ["batch_size", kv, "total_sequence_length", hd])
            layers[f"past_key_values.{i}.{t}"] = layers[f"present.{i}.{t}"] = readers[i]
    inputs["num_logits_to_keep"] = ("int64", [])
    return inputs, outputs, layers


@pytest.mark.parametrize("name", TINY4)
def test_exports_and_verifies(gemma4_artifacts, name):
    out, res = gemma4_artifacts[name]
    assert res["parity"]["passed"], res["parity_table"]


@pytest.mark.parametrize("name", TINY4)
def test_cache_contract_fewer_entries_per_layer_shapes(gemma4_artifacts, name):
    out, _ = gemma4_artifacts[name]
    manifest = json.loads((out / "manifest.json").read_text())
    cfg = manifest["config"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    want_in, want_out, layers = _contract(cfg)
    assert [i.name for i in graph.input] == list(want_in)
    assert [o.name for o in graph.output] == list(want_out)
    for vi in graph.input:
        assert (_dtype(vi), _dims(vi)) == want_in[vi.name]
    for vi in graph.output:
        assert (_dtype(vi), _dims(vi)) == want_out[vi.name]
    io = manifest["io"]
    assert {k: (v["dtype"], v["shape"]) for k, v in io["inputs"].items()} == want_in
    # `layers` is written where an entry is read by more than its own layer (KV sharing)
    said = {k: v["layers"] for side in io.values() for k, v in side.items() if "layers" in v}
    assert said == (layers if cfg["num_kv_shared_layers"] else {})
    if cfg["num_kv_shared_layers"]:
        assert len([n for n in want_in if n.startswith("past")]) < 2 * cfg["num_hidden_layers"]
    # the runtime allocates exactly those shapes
    sess = DecoderSession(out, provider="cpu")
    cache = sess.new_cache(2)
    assert [list(v.shape()) for v in cache.values] == [
        [2, want_in[n][1][1], 0, want_in[n][1][3]] for n in want_in if n.startswith("past")]


def _ragged(vocab, B=2, S=19, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :7] = 0
    ids[1, :7] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("name", TINY4)
def test_onnx_matches_transformers_directly(gemma4_artifacts, name):
    """The artifact against transformers' Gemma4: a ragged prefill past the window, then
    decode steps through the cache (the KV-shared layers read the growing entries)."""
    from tests.models.test_gemma4 import hf_twin

    out, _ = gemma4_artifacts[name]
    hf = hf_twin(load_model(name).model)  # same preset seed as the export
    sess = DecoderSession(out, provider="cpu")
    ids, mask, pos = _ragged(sess.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits.numpy()
    got, cache = sess.forward(ids.numpy(), mask.numpy(), pos.numpy(), sess.new_cache(2))
    real = mask.numpy().astype(bool)
    assert np.abs(got - ref)[real].max() <= 1e-4
    for step in range(4):
        nxt = torch.tensor([[5 + step], [9 + step]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        pos = torch.cat([pos, pos[:, -1:] + 1], 1)
        ids = torch.cat([ids, nxt], 1)
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].numpy()
        got, cache = sess.forward(nxt.numpy(), mask.numpy(), pos[:, -1:].numpy(), cache)
        assert np.abs(got[:, -1] - ref).max() <= 1e-4, step


@pytest.mark.parametrize("name", TINY4)
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_integer_recipe_computes_its_dequantized_weights(gemma4_artifacts, tmp_path, name, precision):
    """accuracy_level 0: the quantized graph is exactly the PyTorch model holding the
    weights it dequantizes to, the PLE table and the MoE experts included (gathered by
    GatherBlockQuantized from their own codes, never stored in fp32)."""
    src, _ = gemma4_artifacts[name]
    out = tmp_path / precision
    quantize_artifact(src, out, precision=precision, verify=False, options=RecipeOptions(accuracy_level=0))
    proto = onnx.load(str(out / "model.onnx"))
    weights = dequantized_weights(proto)
    model = load_model(name).model
    state = model.state_dict()
    cfg = model.config
    if cfg.hidden_size_per_layer_input:
        assert "model.embed_tokens_per_layer.weight" in weights
        gbq = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
        gathered = sorted(n.input[0] for n in gbq)
        assert gathered == ["model.embed_tokens.qweight", "model.embed_tokens_per_layer.qweight"]
        assert not [i for i in proto.graph.initializer if i.name == "model.embed_tokens_per_layer.weight"]
    if cfg.num_experts:  # the experts' tables too: gathered from their codes, none left fp32
        tables = {f"model.layers.{i}.experts.{t}" for i in range(cfg.num_hidden_layers)
                  for t in ("gate_up_proj", "down_proj")}
        assert tables <= weights.keys()
        assert not tables & {i.name for i in proto.graph.initializer}
    for k, w in weights.items():
        assert state[k].shape == w.shape, k
        state[k] = torch.from_numpy(w)
    model.load_state_dict(state)
    rel = graph_vs_model(out, model)
    assert rel <= 1e-5, f"relative L2 {rel:.3g}"


def graph_vs_model(artifact, model) -> float:
    """Relative L2 between the artifact's logits and the PyTorch model's, teacher-forced
    along the model's own 12 greedy tokens after a seeded 15-token prompt."""
    sess = DecoderSession(artifact, provider="cpu")
    prompt = [2] + np.random.default_rng(5).integers(4, sess.vocab_size, 14).tolist()
    ref, tokens = torch_greedy(model, prompt, 12)
    got = onnx_teacher_forced(sess, prompt, tokens)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


# The presets ship trained weights (models/data/TRAINED.md), so their logits have a language
# model's margins and the table's top-1 rows judge the recipe. The dense preset's cheapest
# rows stay in the fast tier.
def _tier(name, precision):
    fast = name == "tiny-gemma4" and precision in ("fp16", "bf16")
    return pytest.param(name, precision, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize(("name", "precision"), [_tier(n, p) for n in TINY4 for p in ("fp16", "int8")])
def test_meets_the_parity_table(gemma4_artifacts, tmp_path, name, precision):
    src, _ = gemma4_artifacts[name]
    res = quantize_artifact(src, tmp_path / precision, precision=precision)
    assert res["parity"]["passed"], res["parity_table"]


@pytest.mark.parametrize(("name", "precision"), [_tier(n, p) for n in TINY4 for p in ("bf16", "int4")])
def test_misses_only_top1_like_the_real_gemma3(gemma4_artifacts, tmp_path, name, precision):
    """bf16 and int4 miss the table's top-1 rows here as they do on the real Gemma 3 270M
    (its strict xfails; docs/design.md): bf16's 8-bit mantissa flips near-ties on a domain or
    more (2026-12-03, Intel Xeon: tiny-gemma4 held-out Korean 98.74%, corpus 99.25%;
    tiny-gemma4-moe four domains 98.35-98.98%), int4 keeps 77% (the real 270M 67%). Every
    other row passes. Fails when the recipe passes the whole table (then it joins the test
    above), like a strict xfail."""
    src, _ = gemma4_artifacts[name]
    try:
        res = quantize_artifact(src, tmp_path / precision, precision=precision)
    except ParityError as e:
        res = e.result
    metrics = {m["name"]: m for m in res["parity"]["metrics"]}
    missed = [k for k, m in metrics.items() if not m["passed"]]
    assert all("top-1 agreement" in k for k in missed), res["parity_table"]
    assert missed, f"{precision} passes the whole table on {name} now: test it with the passing ones"


def test_runtime_generates_with_chat_format(gemma4_artifacts):
    """The torch-free runtime generates from a Gemma 4 artifact; greedy is deterministic
    and the chat wrapper writes Gemma 4's turns (<|turn>, <turn|>), not Gemma 3's, as the
    artifact's own chat template does."""
    out, _ = gemma4_artifacts["tiny-gemma4"]
    gen = load_generator(out, provider="cpu")
    cfg = SamplingConfig(max_new_tokens=12, ignore_eos=True)
    a = gen.generate_result(["hello there"], cfg)
    b = gen.generate_result(["hello there"], cfg)
    c = gen.generate_result(["hello there"], cfg, chat=True)
    assert a.token_ids == b.token_ids and len(a.token_ids[0]) == 12
    turns4 = "<|turn>user\nhello there<turn|>\n<|turn>model\n"
    turns3 = "<start_of_turn>user\nhello there<end_of_turn>\n<start_of_turn>model\n"
    assert c.prompt_tokens[0] == len(gen.tokenizer.encode(turns4, add_bos=True))
    assert c.prompt_tokens[0] != len(gen.tokenizer.encode(turns3, add_bos=True))
    assert gen.tokenizer.id_to_piece(5) == "<turn|>" and 5 in gen.session.eos_ids  # the turn end stops
    template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|turn>" in template and "<start_of_turn>" not in template
