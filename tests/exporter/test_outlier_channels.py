"""rewrites/outlier_channels: the rewrite keeps the product (exact at fp32 compute), keeps
shared inputs shared, and takes an outlier channel out of the int8 activation rounding;
calibrate.outlier_channels picks the channels that dwarf their block."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gemma_export.exporter.blocks import pack, quantize_blocks
from gemma_export.exporter.calibrate import outlier_channels
from gemma_export.exporter.rewrites import MS_DOMAIN, Graph
from gemma_export.exporter.rewrites.outlier_channels import split_outlier_channels

K, BS = 128, 32


def _graph(level: int, ws: list[np.ndarray], bits: int = 8):
    """x -> one MatMulNBits per weight, all reading x."""
    nodes, inits, outs = [], [], []
    for i, w in enumerate(ws):
        b = quantize_blocks(w, bits, BS, symmetric=bits == 8)
        inits += [numpy_helper.from_array(pack(b.codes, bits), f"p{i}.qweight"),
                  numpy_helper.from_array(b.scales.reshape(len(w), -1).astype(np.float32), f"p{i}.scales")]
        inputs = ["x", f"p{i}.qweight", f"p{i}.scales"]
        if not b.default_zero_point:
            from gemma_export.exporter.blocks import pack_zero_points

            inits.append(numpy_helper.from_array(pack_zero_points(b.zero_points, bits), f"p{i}.zero_points"))
            inputs.append(f"p{i}.zero_points")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{i}"], name=f"/p{i}/MatMulNBits", domain=MS_DOMAIN,
                                      K=K, N=len(w), bits=bits, block_size=BS, accuracy_level=level))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K])],
                          outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS_DOMAIN, 1)])


def _run(model, x):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})


def _data():
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal((n, K)) * 0.05).astype(np.float32) for n in (48, 16)]
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    x[..., [3, 70]] *= 60.0  # two outlier channels, in different blocks
    return ws, x


def test_split_is_exact_at_fp32_compute_and_keeps_the_input_shared():
    for bits in (8, 4):
        ws, x = _data()
        before = _run(_graph(0, ws, bits), x)
        model = _graph(0, ws, bits)
        g = Graph(model)
        done = split_outlier_channels(g, {"x": np.array([3, 70])})
        assert done == {"/p0/MatMulNBits": 2, "/p1/MatMulNBits": 2}
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("Mul") == 1 and ops.count("Gather") == 1 and ops.count("MatMul") == 2
        mnb = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert len({n.input[0] for n in mnb}) == 1  # still one shared input: pack_projections stacks them
        for a, b in zip(_run(model, x), before):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_split_takes_the_outliers_out_of_the_int8_rounding():
    ws, x = _data()
    exact = _run(_graph(0, ws), x)
    plain = _run(_graph(4, ws), x)
    model = _graph(4, ws)
    split_outlier_channels(Graph(model), {"x": np.array([3, 70])})
    split = _run(model, x)
    for e, p, s in zip(exact, plain, split):
        err_plain = np.linalg.norm(p - e) / np.linalg.norm(e)
        err_split = np.linalg.norm(s - e) / np.linalg.norm(e)
        assert err_split < err_plain / 5, (err_split, err_plain)


def test_outlier_channels_are_the_ones_that_dwarf_their_block():
    peaks = np.ones(96)
    peaks[5], peaks[40], peaks[70] = 50.0, 3.0, 9.0
    assert outlier_channels(peaks, 32, 8.0).tolist() == [5, 70]
    assert outlier_channels(peaks, 32, 20.0).tolist() == [5]
