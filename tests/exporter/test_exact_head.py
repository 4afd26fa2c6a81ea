"""rewrites/exact_head: the LM head's k largest logits come out as the fp32 product of the
head's input and the very rows its codes dequantize to; every other logit is left as the
int8-activation MatMulNBits computed it; and in a whole int8 artifact the argmax is the one
an fp32-compute head gives."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gemma_export.exporter.blocks import Blocks, pack, quantize_blocks
from gemma_export.exporter.pipeline import quantize_artifact
from gemma_export.exporter.verify import onnx_teacher_forced
from gemma_export.exporter.rewrites import MS_DOMAIN, Graph
from gemma_export.exporter.rewrites.exact_head import HEAD_NODE, exact_top_k
from gemma_export.runtime.manifest import sha256_file
from gemma_export.runtime.session import DecoderSession

V, H, BS = 300, 64, 16


def _head_graph(level: int, b: Blocks) -> onnx.ModelProto:
    """h [M, H] -> the head's MatMulNBits over the codes, and the embedding's
    GatherBlockQuantized reading the same codes (as quantize.py lays them out)."""
    v, kb, bs = b.codes.shape
    inits = [numpy_helper.from_array(pack(b.codes, 8), "e.qweight"),
             numpy_helper.from_array(b.scales.reshape(v, kb).astype(np.float32), "e.scales"),
             numpy_helper.from_array(b.scales.reshape(v, kb, 1).astype(np.float32), "e.gather_scales"),
             numpy_helper.from_array(np.array([0, 0, kb * bs], np.int64), "e.shape")]
    nodes = [
        helper.make_node("MatMulNBits", ["h", "e.qweight", "e.scales"], ["logits"], name=HEAD_NODE, domain=MS_DOMAIN,
                         K=kb * bs, N=v, bits=8, block_size=bs, accuracy_level=level),
        helper.make_node("GatherBlockQuantized", ["e.qweight", "ids", "e.gather_scales"], ["rows"],
                         name="/embed/GatherBlockQuantized", domain=MS_DOMAIN, gather_axis=0, quantize_axis=2,
                         block_size=bs, bits=8),
        helper.make_node("Reshape", ["rows", "e.shape"], ["embedded"], name="/embed/Reshape"),
    ]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, H]),
                                       helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None),
                           helper.make_tensor_value_info("embedded", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])


def _run(model, h):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(["logits"], {"h": h, "ids": np.zeros((1, 1), np.int64)})[0]


def test_top_k_logits_are_the_fp32_products_and_the_rest_untouched():
    rng = np.random.default_rng(0)
    b = quantize_blocks((rng.standard_normal((V, H)) * 0.1).astype(np.float32), 8, BS, True)
    w = b.dequantize().astype(np.float64)  # [V, H], what the codes stand for
    h = rng.standard_normal((6, H)).astype(np.float32)
    h[:, [5, 40]] *= 50.0  # outlier channels: the int8 activation rounding is coarse here
    exact = h.astype(np.float64) @ w.T
    rounded = _run(_head_graph(4, b), h)
    model = _head_graph(4, b)
    assert exact_top_k(Graph(model), 8) == 8
    got = _run(model, h)
    top = np.argsort(-rounded, axis=-1)[:, :8]  # the candidates the rewrite recomputes
    rest = np.ones_like(got, bool)
    np.put_along_axis(rest, top, False, axis=-1)
    np.testing.assert_array_equal(got[rest], rounded[rest])
    on_top = np.take_along_axis(got, top, -1)
    want = np.take_along_axis(exact, top, -1)
    assert np.abs(on_top - want).max() <= 1e-5 * np.abs(want).max()
    # and the rounding it removed was there to remove
    assert np.abs(np.take_along_axis(rounded, top, -1) - want).max() > 100 * np.abs(on_top - want).max()


def test_k_is_capped_at_the_vocabulary_and_a_graph_without_the_head_is_left_alone():
    rng = np.random.default_rng(1)
    b = quantize_blocks((rng.standard_normal((V, H)) * 0.1).astype(np.float32), 8, BS, True)
    model = _head_graph(4, b)
    assert exact_top_k(Graph(model), 10 * V) == V
    h = rng.standard_normal((2, H)).astype(np.float32)
    np.testing.assert_allclose(_run(model, h), h.astype(np.float64) @ b.dequantize().T.astype(np.float64),
                               rtol=1e-5, atol=1e-5)
    other = _head_graph(4, b)
    other.graph.node[0].name = "/something/MatMulNBits"
    assert exact_top_k(Graph(other), 8) == 0
    assert [n.op_type for n in other.graph.node] == ["MatMulNBits", "GatherBlockQuantized", "Reshape"]


def _fp32_head(src, dst):
    """A copy of the artifact without the rewrite, its LM head at accuracy_level 0 (fp32
    activations): the reference the exact top-k must reproduce."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.onnx"):
        m = onnx.load(str(f), load_external_data=False)
        added = [n for n in m.graph.node if n.name.startswith("/lm_head/Exact")]
        assert len(added) == 7, f.name
        logits = next(n for n in added if n.op_type == "ScatterElements").output[0]
        kept = [n for n in m.graph.node if not n.name.startswith("/lm_head/Exact")]
        head = next(n for n in kept if n.name == HEAD_NODE)
        head.output[0] = logits
        next(a for a in head.attribute if a.name == "accuracy_level").i = 0
        del m.graph.node[:]
        m.graph.node.extend(kept)
        onnx.save(m, str(f))
    manifest = json.loads((dst / "manifest.json").read_text())  # the graphs' new sizes and hashes
    for name, entry in manifest["files"].items():
        entry.update(size=(dst / name).stat().st_size, sha256=sha256_file(dst / name))
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_int8_artifact_argmax_is_the_fp32_heads(tiny_artifacts, tmp_path):
    """Through quantize, fusions and the shared cache: every position's argmax and its
    logit are what the same graph gives without the rewrite and with an fp32-compute head."""
    out = tmp_path / "int8"
    quantize_artifact(tiny_artifacts["tiny-gemma3"][0], out, precision="int8", verify=False)
    products = json.loads((out / "manifest.json").read_text())["quantized"]["products"]
    assert products[HEAD_NODE]["exact_top_k"] == 16 and products[HEAD_NODE]["outlier_channels"] == 0
    _fp32_head(out, tmp_path / "fp32-head")
    a, b = DecoderSession(out, provider="cpu"), DecoderSession(tmp_path / "fp32-head", provider="cpu")
    rng = np.random.default_rng(3)
    prompt = [2] + rng.integers(4, a.vocab_size, 40).tolist()
    then = rng.integers(4, a.vocab_size, 8).tolist()  # decode steps through the cache too
    la = onnx_teacher_forced(a, prompt, then)
    lb = onnx_teacher_forced(b, prompt, then)
    np.testing.assert_array_equal(la.argmax(-1), lb.argmax(-1))
    top_a = np.take_along_axis(la, la.argmax(-1)[..., None], -1)
    top_b = np.take_along_axis(lb, lb.argmax(-1)[..., None], -1)
    np.testing.assert_allclose(top_a, top_b, rtol=1e-5, atol=1e-5)
