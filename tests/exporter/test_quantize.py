"""Quantization recipes: the pure math, the GGUF block decoders against gguf's own
dequantizer, the graph rewrite against a PyTorch model holding the same dequantized
weights (so implementation error is separated from quantization error), the tied
embedding stored once, and the real Gemma 3 270M against docs/design.md's thresholds."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from gemma_export.errors import ParityError
from gemma_export.exporter.recipes import RecipeOptions
from gemma_export.exporter.pipeline import quantize_artifact
from gemma_export.exporter.blocks import pack, pack_zero_points, quantize_blocks, unpack
from gemma_export.exporter.gguf_blocks import gguf_blocks
from gemma_export.exporter.quantize import dequantized_weights
from gemma_export.exporter.verify import onnx_ragged_batch, onnx_teacher_forced, torch_greedy
from gemma_export.models.load import load_model
from gemma_export.runtime.session import DecoderSession


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_block_quantization_error_bound(bits, symmetric):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 128)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block must survive
    b = quantize_blocks(w, bits, 32, symmetric)
    assert b.codes.max() < 2**bits and b.codes.shape == (24, 4, 32)
    err = np.abs(b.dequantize() - w).reshape(24, 4, 32)
    # round to nearest: at most half a step, except values clipped at the symmetric edge
    bound = b.scales[..., None] * (0.5 if not symmetric else 1.0) + 1e-6
    assert np.all(err <= bound)
    assert np.all(b.dequantize()[3, :32] == 0.0)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (8, True)])
def test_rows_rounded_a_slab_at_a_time_equal_one_pass(monkeypatch, bits, symmetric):
    """quantize_blocks bounds its memory by rounding a few rows at a time; the codes must
    be those of rounding the whole matrix at once (5-row slabs over 23 rows: a short last one)."""
    import gemma_export.exporter.blocks as q

    w = np.random.default_rng(2).standard_normal((23, 128)).astype(np.float32)
    whole = quantize_blocks(w, bits, 32, symmetric)
    monkeypatch.setattr(q, "ROWS_AT_ONCE", 5 * 128)
    slabs = quantize_blocks(w, bits, 32, symmetric)
    for a, b in [(whole.codes, slabs.codes), (whole.scales, slabs.scales), (whole.zero_points, slabs.zero_points)]:
        np.testing.assert_array_equal(a, b)
    x = q._as_blocks(w, 32)  # and both are the plain one-pass formula
    s, z = q._block_params(x, bits, symmetric)
    np.testing.assert_array_equal(slabs.codes, q._round(x, s[..., None], z[..., None], bits))


def test_graph_without_the_tied_embedding_is_refused_in_one_line():
    from onnx import TensorProto, helper

    from gemma_export.errors import ExportError
    from gemma_export.exporter.quantize import RECIPES, quantize_graph

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(ExportError, match="tied embedding"):
        quantize_graph(helper.make_model(g), RECIPES["int8"])


def test_pack_unpack_roundtrip():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (5, 3, 32)).astype(np.uint8)
    np.testing.assert_array_equal(unpack(pack(codes, 4), 4, 32), codes)
    assert pack(codes, 4).shape == (5, 3, 16)
    zp = rng.integers(0, 16, (5, 3)).astype(np.uint8)
    packed = pack_zero_points(zp, 4)
    assert packed.shape == (5 * 2,)
    assert (packed.reshape(5, 2)[:, 0] & 0x0F).tolist() == zp[:, 0].tolist()


def _tiny_fp32(tiny_artifacts, name):
    return tiny_artifacts[name][0]


def _check_against_dequantized(src, out, name, tol):
    """ONNX (quantized) vs PyTorch holding exactly the weights the artifact dequantizes to."""
    ckpt = load_model(name)
    proto = onnx.load(str(out / "model.onnx"))
    weights = dequantized_weights(proto)
    model = ckpt.model
    state = model.state_dict()
    assert "model.embed_tokens.weight" in weights
    for k, w in weights.items():
        assert state[k].shape == w.shape, k
        state[k] = torch.from_numpy(w)
    model.load_state_dict(state)
    sess = DecoderSession(out, provider="cpu")
    rng = np.random.default_rng(5)
    prompt = [2] + rng.integers(4, sess.vocab_size, 14).tolist()
    ref, tokens = torch_greedy(model, prompt, 12)
    got = onnx_teacher_forced(sess, prompt, tokens)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= tol, f"relative L2 {rel:.3g} > {tol}"
    return proto


@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_recipe_computes_its_dequantized_weights(tiny_artifacts, tmp_path, name, precision):
    """accuracy_level 0 (fp32 compute): the quantized graph is the dequantized model exactly."""
    src = _tiny_fp32(tiny_artifacts, name)
    out = tmp_path / precision
    quantize_artifact(src, out, precision=precision, verify=False, options=RecipeOptions(accuracy_level=0))
    proto = _check_against_dequantized(src, out, name, 1e-5)
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    assert "Gemm" not in ops and "Gather" not in ops
    # the tied embedding: one quantized matrix, read by the gather and the LM head
    q = [n for n in proto.graph.node if "model.embed_tokens.qweight" in n.input]
    assert sorted(n.op_type for n in q) == ["GatherBlockQuantized", "MatMulNBits"]
    assert not [i for i in proto.graph.initializer if i.name == "model.embed_tokens.weight"]
    assert sum(1 for i in proto.graph.initializer if i.name == "model.embed_tokens.qweight") == 1


def _several_at_once(sess, vocab):
    """A left-padded batch of 2, then 3 new tokens in one call onto the filled cache."""
    rng = np.random.default_rng(4)
    ids = np.array([[0, 0, 2] + rng.integers(4, vocab, 4).tolist(), [2] + rng.integers(4, vocab, 6).tolist()])
    mask = (ids != 0).astype(np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    _, cache = sess.forward(ids, mask, pos, sess.new_cache(2))
    more = rng.integers(4, vocab, (2, 3))
    logits, cache = sess.forward(more, np.concatenate([mask, np.ones((2, 3), np.int64)], 1), pos[:, -1:] + [1, 2, 3],
                                 cache)
    assert sess.cache_length(cache) == 10
    return logits


@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_fused_graph_shares_the_cache_and_ships_a_portable_sibling(tiny_artifacts, tmp_path, name):
    """The integer recipes' fused graph reads and writes one KV buffer per tensor (the
    manifest and the graph's I/O say cache_capacity); model.portable.onnx keeps the traced
    contract, reads the same weights file (no second copy), and computes the same logits."""
    from gemma_export.contract import io_spec
    from gemma_export.models.config import GemmaConfig

    out = tmp_path / "int4"
    quantize_artifact(_tiny_fp32(tiny_artifacts, name), out, precision="int4", options=RecipeOptions(accuracy_level=0),
                      verify=False)
    m = json.loads((out / "manifest.json").read_text())
    cfg = GemmaConfig.from_dict(m["config"])
    assert m["kv_cache"] == "shared" and m["portable_model_file"] == "model.portable.onnx"
    assert m["provider_model_files"] == {"cuda": "model.portable.onnx"}  # verified on CPU only
    assert m["io"] == io_spec(cfg, kv_cache="shared")
    assert m["portable_io"] == io_spec(cfg)  # the sibling's own contract: sliding entries are windows
    assert m["data_file"] == "onnx/model_q4.onnx_data"  # transformers.js's q4 file holds the weights
    assert set(m["files"]) >= {"model.onnx", "model.portable.onnx", m["data_file"], "onnx/model_q4.onnx"}
    fused, portable = (onnx.load(str(out / f), load_external_data=False) for f in ("model.onnx", "model.portable.onnx"))

    def dims(proto, name):
        v = next(x for x in [*proto.graph.input, *proto.graph.output] if x.name == name)
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    contract = io_spec(cfg)
    for name_, spec in [*contract["inputs"].items(), *contract["outputs"].items()]:
        if name_ != "num_logits_to_keep":
            assert dims(portable, name_) == spec["shape"], name_
    assert dims(fused, "past_key_values.0.key")[2] == dims(fused, "present.0.value")[2] == "cache_capacity"
    assert "GroupQueryAttention" in {n.op_type for n in fused.graph.node}
    assert "GroupQueryAttention" not in {n.op_type for n in portable.graph.node}
    external = {e.value for p in (fused, portable) for t in p.graph.initializer for e in t.external_data
                if e.key == "location"}
    assert external == {m["data_file"]}
    inline = [t.name for t in portable.graph.initializer if len(t.raw_data) > 1024]
    assert not inline  # every weight is read from the one data file
    a, b = DecoderSession(out, provider="cpu"), DecoderSession(out, provider="cpu", portable=True)
    assert a.shared_cache and not b.shared_cache
    window = [cfg.sliding_window - 1 if t == "sliding_attention" else None for t in m["layer_types"] for _ in (0, 1)]
    assert a.kv_keep == [None] * len(window) and b.kv_keep == window  # the fused graph keeps every position
    rng = np.random.default_rng(3)
    seqs = [[2] + rng.integers(4, cfg.vocab_size, 22).tolist() for _ in range(3)]
    got = np.concatenate(onnx_ragged_batch(a, seqs, [17, 9, 3], steps=5))
    ref = np.concatenate(onnx_ragged_batch(b, seqs, [17, 9, 3], steps=5))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    # several tokens onto a filled cache at batch 2 (GroupQueryAttention takes them one by one)
    got, ref = _several_at_once(a, cfg.vocab_size), _several_at_once(b, cfg.vocab_size)
    assert got.shape == ref.shape == (2, 3, cfg.vocab_size)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_shared_cache_refuses_a_superseded_cache(tiny_artifacts, tmp_path):
    """A shared cache is advanced in place: stepping again from an older cache of the same
    chain would overwrite what the newer one holds, so it is refused; the newest works."""
    from gemma_export.errors import RuntimeConfigError

    out = tmp_path / "int8"
    quantize_artifact(_tiny_fp32(tiny_artifacts, "tiny-gemma3"), out, precision="int8", verify=False)
    sess = DecoderSession(out, provider="cpu")
    ids = np.array([[2, 9, 10, 11]])
    _, c1 = sess.forward(ids, np.ones_like(ids), np.arange(4)[None], sess.new_cache(1, capacity=16))
    _, c2 = sess.forward(np.array([[5]]), np.ones((1, 5), np.int64), np.array([[4]]), c1)
    with pytest.raises(RuntimeConfigError, match="newest"):
        sess.forward(np.array([[6]]), np.ones((1, 5), np.int64), np.array([[4]]), c1)
    _, c3 = sess.forward(np.array([[6]]), np.ones((1, 6), np.int64), np.array([[5]]), c2)
    assert sess.cache_length(c3) == 6


@pytest.mark.parametrize("name", ["tiny-gemma2"])
def test_int8_activations_stay_close(tiny_artifacts, tmp_path, name):
    """The default accuracy_level 4 quantizes activations too: close, not exact."""
    src = _tiny_fp32(tiny_artifacts, name)
    out = tmp_path / "int4-l4"
    quantize_artifact(src, out, precision="int4", verify=False, options=RecipeOptions(symmetric=False))
    _check_against_dequantized(src, out, name, 2e-2)


def test_quantize_refuses_bad_input(tiny_artifacts, tmp_path):
    from gemma_export.errors import ArtifactError, UsageError

    src = _tiny_fp32(tiny_artifacts, "tiny-gemma1")
    with pytest.raises(UsageError, match="block-size"):
        quantize_artifact(src, tmp_path / "a", precision="int4", options=RecipeOptions(block_size=24))
    with pytest.raises(UsageError, match="gguf"):
        quantize_artifact(src, tmp_path / "b", precision="gguf", options=RecipeOptions(block_size=32))
    with pytest.raises(ArtifactError, match="GGUF"):
        quantize_artifact(src, tmp_path / "c", precision="gguf")  # a preset has no GGUF blocks
    q = tmp_path / "q"
    quantize_artifact(src, q, precision="int8", verify=False)
    with pytest.raises(ArtifactError, match="fp32"):
        quantize_artifact(q, tmp_path / "d", precision="int4")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_quantize_reads_a_hard_linked_weights_file(tiny_artifacts, tmp_path):
    """onnx.load refuses external data with a second hard link (`cp -al` copies, say); the
    recipes read the weights a tensor at a time (lazy_weights), so such a copy quantizes,
    to the same weights as its original."""
    import os
    import shutil

    src = tmp_path / "src"
    shutil.copytree(_tiny_fp32(tiny_artifacts, "tiny-gemma1"), src)
    data = src / json.loads((src / "manifest.json").read_text())["data_file"]
    os.link(data, tmp_path / "second-link")
    quantize_artifact(src, tmp_path / "q", precision="int8", verify=False)
    os.unlink(tmp_path / "second-link")
    quantize_artifact(src, tmp_path / "p", precision="int8", verify=False)
    q, p = ((d / json.loads((d / "manifest.json").read_text())["data_file"]).read_bytes() for d in
            (tmp_path / "q", tmp_path / "p"))
    assert q == p


def test_lazy_weights_refuses_a_weights_file_outside_the_graphs_folder(tmp_path):
    """An external-data location that leaves the graph's folder is one line, not a read."""
    import onnx
    from onnx import helper

    from gemma_export.errors import ArtifactError
    from gemma_export.exporter import lazy_weights

    (tmp_path / "g").mkdir()
    (tmp_path / "outside.bin").write_bytes(bytes(4096))
    t = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[1024])
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "../outside.bin"), ("offset", "0"), ("length", "4096")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1024])], [t])
    onnx.save(helper.make_model(g), str(tmp_path / "g" / "model.onnx"))
    with pytest.raises(ArtifactError, match="not in the graph's folder") as e:
        lazy_weights.load(tmp_path / "g" / "model.onnx")
    assert "\n" not in str(e.value)


def test_lazy_weights_reads_small_tensors_inline(tmp_path):
    """A tensor under SMALL bytes that the exporter put in the weights file is read into the
    graph at load, as onnx.load would (a graph written from it, the portable sibling whose
    rewrites drop it from the fused graph included, then holds it inline); a large one stays
    in the file, mapped."""
    import onnx
    from onnx import helper, numpy_helper

    from gemma_export.exporter import lazy_weights

    small, large = np.arange(4, dtype=np.int64), np.arange(2048, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(small.tobytes() + large.tobytes())
    tensors = []
    for name, a, offset in (("small", small, 0), ("large", large, small.nbytes)):
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", "w.bin"), ("offset", str(offset)), ("length", str(a.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        tensors.append(t)
    g = helper.make_graph([helper.make_node("Identity", ["large"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2048])], tensors)
    onnx.save(helper.make_model(g), str(tmp_path / "model.onnx"))
    proto = lazy_weights.load(tmp_path / "model.onnx")
    got = {t.name: t for t in proto.graph.initializer}
    assert got["small"].data_location != onnx.TensorProto.EXTERNAL
    np.testing.assert_array_equal(numpy_helper.to_array(got["small"]), small)
    assert got["large"].data_location == onnx.TensorProto.EXTERNAL
    np.testing.assert_array_equal(lazy_weights.array(got["large"]), large)


def test_lazy_weights_save_writes_what_onnx_save_writes(tiny_artifacts, tmp_path):
    """A graph read lazily and saved a tensor at a time loads (onnx.load, weights and all)
    to the same initializers as the graph it was read from."""
    import onnx
    from onnx import numpy_helper

    from gemma_export.exporter import lazy_weights

    src = _tiny_fp32(tiny_artifacts, "tiny-gemma3") / "model.onnx"
    proto = lazy_weights.load(src)
    w = next(t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    w.CopyFrom(numpy_helper.from_array(lazy_weights.array(w) * 2, w.name))  # one tensor the "recipe" made
    (tmp_path / "out").mkdir()
    lazy_weights.save(proto, tmp_path / "out")
    a, b = onnx.load(str(src)), onnx.load(str(tmp_path / "out" / "model.onnx"))
    want = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    got = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name] * 2 if name == w.name else want[name], err_msg=name)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_large_tensors_through_the_scratch_file_give_the_same_artifact(tiny_artifacts, tmp_path, monkeypatch,
                                                                        precision):
    """Tensors a recipe makes past SCRATCH_BYTES wait in a scratch file (E2B's 2.35 GB PLE
    codes cannot sit in a TensorProto); with the bound lowered so that every weight goes
    there, the artifact's weights are the same, and no scratch file is left in it."""
    from gemma_export.exporter import lazy_weights

    src = _tiny_fp32(tiny_artifacts, "tiny-gemma3")
    quantize_artifact(src, tmp_path / "memory", precision=precision, verify=False)
    monkeypatch.setattr(lazy_weights, "SCRATCH_BYTES", 4096)
    quantize_artifact(src, tmp_path / "scratch", precision=precision, verify=False)
    want, got = (_initializers(tmp_path / d) for d in ("memory", "scratch"))
    assert want.keys() == got.keys() and any(v.nbytes >= 4096 for v in got.values())
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert sorted(p.name for p in (tmp_path / "scratch").iterdir()) == sorted(
        p.name for p in (tmp_path / "memory").iterdir())


def _initializers(d) -> dict:
    from onnx import numpy_helper

    m = onnx.load(str(d / json.loads((d / "manifest.json").read_text())["model_file"]))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


# -- real model ----------------------------------------------------------------------------------


@pytest.mark.real
def test_gguf_block_decoders_match_gguf(real_gguf):
    import gguf

    reader = gguf.GGUFReader(str(real_gguf))
    seen = set()
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind in seen or kind not in ("Q8_0", "Q5_0", "Q6_K", "Q4_K"):
            continue
        seen.add(kind)
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        n, k = ref.shape
        b = gguf_blocks(np.asarray(t.data).view(np.uint8), kind, n, k)
        got = b.dequantize()
        assert np.allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max()), kind
    assert seen == {"Q8_0", "Q5_0", "Q6_K", "Q4_K"}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_split_blocks_compute_the_same_weights(tiny_artifacts, tmp_path, monkeypatch, precision):
    """A recipe's blocks split to 16 (a finer int8 activation grid at accuracy_level 4): every
    product's MatMulNBits has block 16 and dequantizes to the weights of the unsplit recipe,
    and at accuracy_level 0 the graph is that dequantized model."""
    from dataclasses import replace

    from gemma_export.exporter import quantize

    src = _tiny_fp32(tiny_artifacts, "tiny-gemma3")
    recipe = quantize.RECIPES[precision]
    monkeypatch.setitem(quantize.RECIPES, precision, replace(recipe, activation_block=0))
    quantize_artifact(src, tmp_path / "32", precision=precision, verify=False, options=RecipeOptions(accuracy_level=0))
    monkeypatch.setitem(quantize.RECIPES, precision, replace(recipe, activation_block=16))
    out = tmp_path / "16"
    quantize_artifact(src, out, precision=precision, verify=False, options=RecipeOptions(accuracy_level=0))
    proto = _check_against_dequantized(src, out, "tiny-gemma3", 1e-5)

    def sizes(p):
        return {{a.name: a.i for a in n.attribute}["block_size"] for n in p.graph.node if n.op_type == "MatMulNBits"}

    whole_proto = onnx.load(str(tmp_path / "32" / "model.onnx"))
    assert sizes(whole_proto) == {32} and sizes(proto) == {16}
    whole = dequantized_weights(whole_proto)
    split = dequantized_weights(proto)
    assert whole.keys() == split.keys()
    for k in whole:
        np.testing.assert_array_equal(whole[k], split[k], err_msg=k)


@pytest.fixture(scope="module")
def real_quantized(real_artifact, tmp_path_factory, real_ckpt):
    """fp16, bf16, int8, int4 (GPTQ, the default), int4 rounded to nearest and gguf
    artifacts of the real 270M, each verified against fp32 PyTorch."""
    from gemma_export.exporter import pipeline

    src = real_artifact[0]
    root = tmp_path_factory.mktemp("realq")
    orig = pipeline._load_source
    pipeline._load_source = lambda d, m, model: real_ckpt  # the session's loaded model
    try:
        out = {}
        for p in ("fp16", "bf16", "int8", "int4", "int4-rtn", "gguf"):
            try:
                kw = dict(precision="int4", options=RecipeOptions(gptq=False)) if p == "int4-rtn" else dict(precision=p)
                out[p] = (root / p, quantize_artifact(src, root / p, **kw))
            except ParityError as e:  # the artifact is written; its report says what missed
                out[p] = (root / p, e.result)
        return out
    finally:
        pipeline._load_source = orig


INT4_MISS = (
    "Known miss, measured: int4 (block 32, asymmetric, GPTQ body, round-to-nearest tied head) keeps "
    "67% corpus top-1 agreement with fp32 on Gemma 3 270M (perplexity +35%; round to nearest: 65%, "
    "+42%), below docs/design.md's 90% / +15%. The tied head alone at int4 drops it to 82% whatever the "
    "rounding (RTN, MSE clipping, AWQ scaling, GPTQ: 80-82%). The gguf recipe (the file's own "
    "4/5/6/8-bit blocks) passes instead. strict: this fails the day int4 passes, so the note gets updated."
)


BF16_MISS = (
    "Known miss, measured: bf16 products (fp16 tied embedding / LM head, everything else that sets "
    "the range fp32) keep 98.9% corpus top-1 agreement with fp32 on Gemma 3 270M, under docs/design.md's "
    "99% (logits rel L2 0.007, teacher-forced greedy 99.0%, perplexity unchanged). bf16's 8-bit mantissa on every "
    "product's input and output is the cost; fp16 (11 bits) keeps 99.5%. strict: update when it passes."
)


@pytest.mark.real
@pytest.mark.parametrize(
    "precision",
    ["fp16", pytest.param("bf16", marks=pytest.mark.xfail(strict=True, reason=BF16_MISS)), "int8",
     pytest.param("int4", marks=pytest.mark.xfail(strict=True, reason=INT4_MISS)), "gguf"],
)
def test_real_recipes_meet_thresholds(real_quantized, precision):
    """Every row of the parity report passes, the held-out domains' included."""
    out, res = real_quantized[precision]
    missed = [m["name"] for m in res["parity"]["metrics"] if not m["passed"]]
    assert not missed, res["parity_table"]


def _heldout_cases():
    from gemma_export.contract import HELDOUT_DOMAINS

    return [(p, d) for p in ("int8", "gguf") for d in HELDOUT_DOMAINS]


@pytest.mark.real
@pytest.mark.parametrize(("precision", "domain"), _heldout_cases())
def test_real_heldout_domain_meets_thresholds(real_quantized, precision, domain):
    """Text no recipe is tuned on (English prose, dialogue, Korean, Japanese, Russian, code,
    numbers): top-1 and perplexity by the parity table's int8 / gguf rows."""
    from gemma_export.contract import Precision
    from gemma_export.exporter.precision import THRESHOLDS

    out, res = real_quantized[precision]
    th = THRESHOLDS[Precision(precision)]
    r = res["parity"]["heldout"][domain]
    assert r["top1"] >= th.top1_agreement and r["perplexity_increase"] <= th.perplexity_increase, r


@pytest.mark.real
@pytest.mark.parametrize("precision", ["int8", "gguf"])
def test_real_manifest_records_every_product(real_quantized, precision):
    """The manifest says how every product computes: all at accuracy_level 4, most of the
    decoder's with outlier channels in fp32 beside them, the LM head with its 16 largest
    logits recomputed in fp32 instead."""
    out, res = real_quantized[precision]
    products = json.loads((out / "manifest.json").read_text())["quantized"]["products"]
    assert "/lm_head/MatMulNBits" in products and len(products) >= 18 * 4 + 1  # 4+ per layer, the head
    assert {p["accuracy_level"] for p in products.values()} == {4}
    head = products.pop("/lm_head/MatMulNBits")
    assert head["exact_top_k"] == 16 and head["outlier_channels"] == 0
    assert sum(p["outlier_channels"] > 0 for p in products.values()) > len(products) // 2


@pytest.mark.real
def test_real_narrow_recipes_hold_range_and_size(real_quantized):
    """fp16: no product needed the range guard on the 270M, no inf/NaN; both narrow
    artifacts hold the weights once at 2 bytes (268M params -> ~540 MB, fp32 is 1078 MB)."""
    for p in ("fp16", "bf16"):
        out, res = real_quantized[p]
        metrics = {m["name"]: m for m in res["parity"]["metrics"]}
        assert metrics["non-finite logits"]["measured"] == 0
        assert metrics["logits relative L2"]["passed"], res["parity_table"]
        assert 500e6 < res["size_bytes"] < 560e6, res["size_bytes"]
        m = json.loads((out / "manifest.json").read_text())
        assert m["quantized"]["kept_fp32_products"] == {} and m["provider_model_files"] == {"cpu": "model.cpu.onnx"}


def _corpus(res) -> tuple[float, float]:
    """(perplexity increase, top-1 agreement) from a parity report."""
    m = {x["name"].split(" (")[0]: x["measured"] for x in res["parity"]["metrics"]}
    return m["corpus perplexity increase"], m["corpus top-1 agreement"]


@pytest.mark.real
def test_real_int4_gptq_beats_round_to_nearest(real_quantized):
    """Calibrated on text the model samples (never the evaluation text), GPTQ must cost the
    shipped text less than round to nearest on both measures."""
    ppl_g, top_g = _corpus(real_quantized["int4"][1])
    ppl_r, top_r = _corpus(real_quantized["int4-rtn"][1])
    assert ppl_g < ppl_r and top_g > top_r, (ppl_g, ppl_r, top_g, top_r)


@pytest.mark.real
def test_real_int4_size_proves_embedding_quantized_once(real_quantized):
    out, res = real_quantized["int4"]
    # 268M weights at 4 bits is 134 MB (+ fp32 scales, 1/8 of that per copy); one fp32
    # copy of the 262144 x 640 embedding alone would be 671 MB.
    assert res["size_bytes"] < 250e6, res["size_bytes"]


def test_float_zero_points_become_integer_codes_plus_exact_offset():
    """GGUF K-quants (w = scale*q - min) run through the fast integer-zero-point kernel plus
    a block-sum correction; the result equals x @ dequantize(w).T."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from gemma_export.exporter.blocks import Blocks
    from gemma_export.exporter.lazy_weights import Initializers
    from gemma_export.exporter.quantize import _matmulnbits

    rng = np.random.default_rng(3)
    n, kb, bs = 24, 4, 32
    b = Blocks(
        rng.integers(0, 16, (n, kb, bs)).astype(np.uint8),
        (rng.random((n, kb)) * 0.05).astype(np.float32),
        (rng.random((n, kb)) * 10).astype(np.float32),
        4,
    )
    inits = Initializers()
    nodes = _matmulnbits("/t/MatMulNBits", "x", "y", b, "t", inits, level=0)
    assert [x.op_type for x in nodes][0] == "MatMulNBits" and "ReduceSum" in [x.op_type for x in nodes]
    assert len(nodes[0].input) == 3  # the kernel's default (integer) zero point: the fast path
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, kb * bs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.standard_normal((2, 3, kb * bs)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    ref = x @ b.dequantize().T
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    # and dequantized_weights reads the same matrix back
    w = dequantized_weights(model)["t.weight"]
    np.testing.assert_allclose(w, b.dequantize(), rtol=1e-5, atol=1e-6)


@pytest.mark.real
def test_real_fused_and_portable_graphs_are_one_model(real_artifact, tmp_path):
    """On the real 270M (int4, fp32 compute so that nothing but the graphs differs), the
    shared-cache GroupQueryAttention graph and its contract-exact sibling give the same
    logits through a 64-token prefill and 64 decode steps on real text. (At the default
    accuracy_level 4 the two differ by ~3% relative L2: MatMulNBits rounds activations to
    int8 per block, and fp32-level differences flip roundings.)"""
    from gemma_export.runtime.bench import prompt_ids
    from gemma_export.runtime.tokenizer import Tokenizer

    out = tmp_path / "int4"
    quantize_artifact(real_artifact[0], out, precision="int4", verify=False,
                      options=RecipeOptions(accuracy_level=0, gptq=False))
    ids = prompt_ids(Tokenizer.from_file(out / "tokenizer.model"), 128)
    fused, portable = DecoderSession(out, provider="cpu"), DecoderSession(out, provider="cpu", portable=True)
    assert fused.shared_cache and not portable.shared_cache
    got, ref = (onnx_teacher_forced(s, ids[:64], ids[64:]) for s in (fused, portable))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 1e-5


