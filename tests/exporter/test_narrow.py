"""fp16 / bf16 recipes: bf16 rounding against torch's, the range guard keeping an
overflowing product fp32, each tiny family through verify, the bf16 CPU graph computing
what a bf16 GEMM computes, and the real Gemma 3 270M against docs/design.md's thresholds
(in test_quantize's real_quantized fixture)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gemma_export.contract import EMBED_WEIGHT
from gemma_export.errors import ParityError, UsageError
from gemma_export.exporter import narrow
from gemma_export.exporter.recipes import RecipeOptions
from gemma_export.exporter.pipeline import quantize_artifact
from gemma_export.runtime.session import DecoderSession


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    a = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-8, 8, 10000),
        np.array([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.4e38, -3.4e38, np.inf, -np.inf], np.float32),
    ]).astype(np.float32)
    ref = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(narrow.to_bf16_bits(a), ref)
    assert np.isnan(narrow.from_bf16_bits(narrow.to_bf16_bits(np.array([np.nan], np.float32))))[0]


def _two_matmuls(scale_second: float) -> onnx.ModelProto:
    """x -> MatMul(W1) -> MatMul(W2 * scale) -> y, plus an 'embedding' Gather (the recipe
    requires one)."""
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "a.MatMul.weight")
    w2 = numpy_helper.from_array((rng.standard_normal((32, 8)) * scale_second).astype(np.float32), "b.MatMul.weight")
    emb = numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), EMBED_WEIGHT)
    nodes = [
        helper.make_node("Gather", [EMBED_WEIGHT, "input_ids"], ["e"], name="/embed/Gather"),
        helper.make_node("MatMul", ["e", "a.MatMul.weight"], ["h"], name="/a/MatMul"),
        helper.make_node("MatMul", ["h", "b.MatMul.weight"], ["y"], name="/b/MatMul"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w1, w2, emb])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def _run(m: onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_ids": ids})[0]


def test_range_guard_keeps_an_overflowing_product_fp32(tmp_path):
    ids = np.arange(10, dtype=np.int64)[None]
    m = _two_matmuls(scale_second=3000.0)  # outputs reach ~1e5-1e6: past fp16's 65504
    onnx.save(m, str(tmp_path / "model.onnx"))
    ref = _run(m, ids)
    assert np.abs(ref).max() > narrow.FP16_MAX

    unguarded = onnx.ModelProto()
    unguarded.CopyFrom(m)
    narrow.narrow_graph(unguarded, narrow.NarrowRecipe("fp16"))
    assert not np.isfinite(_run(narrow.cpu_fallback_graph(unguarded), ids)).all()  # what the guard prevents
    # (ONNX Runtime's own CPU fp16 MatMul hides it: it computes in fp32 behind the graph)
    assert np.isfinite(_run(unguarded, ids)).all()

    keep = narrow.range_guard(tmp_path / "model.onnx", m, ids)
    assert list(keep) == ["/b/MatMul"] and keep["/b/MatMul"] > narrow.FP16_MAX
    guarded = onnx.ModelProto()
    guarded.CopyFrom(m)
    summary = narrow.narrow_graph(guarded, narrow.NarrowRecipe("fp16"), keep)
    got = _run(narrow.cpu_fallback_graph(guarded), ids)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-3
    assert summary["kept_fp32_products"] == keep and summary["products"] == 1
    types = {t.name: t.data_type for t in guarded.graph.initializer}
    assert types["b.MatMul.weight"] == TensorProto.FLOAT and types["a.MatMul.weight"] == TensorProto.FLOAT16


def test_calibrate_ranges_reads_an_artifact_in_place(tiny_artifacts):
    src = tiny_artifacts["tiny-gemma3"][0]
    proto = onnx.load(str(src / "model.onnx"), load_external_data=False)
    names = [n.output[0] for n in proto.graph.node if n.op_type == "MatMul"][:3]
    before = sorted(p.name for p in src.iterdir())
    ranges = narrow.calibrate_ranges(src / "model.onnx", np.array([[2, 5, 7, 9]]), names)
    assert set(ranges) == set(names) and all(0 < v < 1e4 for v in ranges.values())
    assert sorted(p.name for p in src.iterdir()) == before


def test_bf16_cpu_graph_computes_a_bf16_gemm():
    """bf16 inputs, fp32 accumulation, bf16 output: torch's bf16 matmul on CPU does the
    same (inputs and output rounded to bf16)."""
    m = _two_matmuls(scale_second=1.0)
    narrow.narrow_graph(m, narrow.NarrowRecipe("bf16"))
    bf16_products = [n for n in m.graph.node if n.op_type == "MatMul"]
    # ONNX Runtime's CPU provider has no bf16 MatMul (its error type is ORT's own)
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        _run(m, np.zeros((1, 1), np.int64))
    cpu = narrow.cpu_fallback_graph(m)
    ids = np.arange(10, dtype=np.int64)[None]
    got = _run(cpu, ids)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.data_type != TensorProto.BFLOAT16}
    bf = {t.name: torch.from_numpy(narrow.from_bf16_bits(np.frombuffer(t.raw_data, np.uint16).reshape(t.dims)))
          for t in m.graph.initializer if t.data_type == TensorProto.BFLOAT16}
    e = torch.from_numpy(inits[EMBED_WEIGHT].astype(np.float32)[ids[0]])  # the fp16 embedding
    h = (e.bfloat16() @ bf["a.MatMul.weight"].bfloat16()).float()
    y = (h.bfloat16() @ bf["b.MatMul.weight"].bfloat16()).float().numpy()
    assert len(bf16_products) == 2 and set(bf) == {"a.MatMul.weight", "b.MatMul.weight"}
    np.testing.assert_allclose(got[0], y, rtol=1e-2, atol=1e-2 * np.abs(y).max())


@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_fp16_tiny_families_meet_thresholds(tiny_artifacts, tmp_path, name):
    res = quantize_artifact(tiny_artifacts[name][0], tmp_path / "fp16", precision="fp16")
    assert res["parity"]["passed"], res["parity_table"]
    # Below identity the corpus judges top-1; the 192 greedy steps are reported (design.md "Parity").
    ops = {m["name"].split(" (")[0]: m["op"] for m in res["parity"]["metrics"]}
    assert ops["greedy top-1 agreement"] == "info" and ops["corpus top-1 agreement"] == ">="
    m = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert m["recipe"]["name"] == "fp16" and m["quantized"]["kept_fp32_products"] == {}
    assert any("softmax" in k for k in m["kept_fp32"])
    types = {t.name: t.data_type for t in onnx.load(str(tmp_path / "fp16" / "model.onnx")).graph.initializer}
    assert types[EMBED_WEIGHT] == TensorProto.FLOAT16
    assert all(types[k] == TensorProto.FLOAT16 for k in types if k.endswith(".MatMul.weight"))


@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_bf16_tiny_families(tiny_artifacts, tmp_path, name):
    """Against the thresholds that mean something on random weights: logits relative L2,
    no inf/NaN, self-consistency. Corpus top-1 is not asserted here: a random tiny model's
    next-token distribution is nearly flat (perplexity ~850 of a 1024 vocabulary), so bf16's
    0.4% rounding reorders near-ties (98-99% agreement measured). The real 270M is held to
    the full table."""
    out = tmp_path / "bf16"
    try:
        res = quantize_artifact(tiny_artifacts[name][0], out, precision="bf16")
    except ParityError as e:
        res = e.result
    metrics = {m["name"]: m for m in res["parity"]["metrics"]}
    for key in ("logits relative L2", "non-finite logits", "prefill+decode vs one forward (rel L2)",
                "ragged batch vs alone (rel L2)"):
        assert metrics[key]["passed"], res["parity_table"]
    # weights stored once, shared by both graphs; the runtime picks the CPU one here
    assert (out / "model.cpu.onnx").stat().st_size < 200_000
    main = onnx.load(str(out / "model.onnx"), load_external_data=False)
    cpu = onnx.load(str(out / "model.cpu.onnx"), load_external_data=False)
    locs = {e.value for t in list(main.graph.initializer) + list(cpu.graph.initializer) for e in t.external_data
            if e.key == "location"}
    assert locs == {json.loads((out / "manifest.json").read_text())["data_file"]}
    types = {t.name: t.data_type for t in main.graph.initializer}
    assert types[EMBED_WEIGHT] == TensorProto.FLOAT16
    assert all(types[k] == TensorProto.BFLOAT16 for k in types if k.endswith(".MatMul.weight"))
    sess = DecoderSession(out, provider="cpu")
    assert sess.model_path.name == "model.cpu.onnx"


def test_narrow_recipes_refuse_integer_options(tiny_artifacts, tmp_path):
    src = tiny_artifacts["tiny-gemma1"][0]
    with pytest.raises(UsageError, match="--block-size"):
        quantize_artifact(src, tmp_path / "a", precision="fp16", options=RecipeOptions(block_size=32))
    with pytest.raises(UsageError, match="fp32"):
        quantize_artifact(src, tmp_path / "b", precision="fp32")
    assert not (tmp_path / "a").exists()
