"""ONNX's Attention (opset 23) against com.microsoft's GroupQueryAttention, one decode step.

    .venv/bin/python benchmarks/attention_ops.py [--threads 2] [--past 192 1024]

Gemma 3 270M's shapes (4 query heads, 1 KV head, head_dim 256), 18 layers chained in one
graph as in the model, one new token over a past of P positions, ONNX Runtime's CPU
provider. Both nodes get the same additive mask and past; the script prints the time per
step of each, and the largest difference between their outputs. This is the measurement
behind the attention rule's choice of op (exporter/rewrites/attention.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 18, 4, 1, 256


def graph(op: str, past: int) -> bytes:
    nodes, outs, q = [], [], "q"
    for i in range(LAYERS):
        y = f"y{i}"
        if op == "GroupQueryAttention":
            ins = [q, "k", "v", "pk", "pv", "seqlens_k", "total", "", "", "", "mask"]
            nodes.append(h.make_node(op, ins, [y, f"pk{i}", f"pv{i}"], domain="com.microsoft", num_heads=Q_HEADS,
                                     kv_num_heads=KV_HEADS, scale=HEAD_DIM**-0.5))
        else:
            nodes.append(h.make_node(op, [q, "k", "v", "mask", "pk", "pv"], [y, f"pk{i}", f"pv{i}"],
                                     q_num_heads=Q_HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM**-0.5))
        outs += [f"pk{i}", f"pv{i}"]
        q = y
    f = T.FLOAT
    inputs = [h.make_tensor_value_info("q", f, [1, 1, Q_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("k", f, [1, 1, KV_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("v", f, [1, 1, KV_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("pk", f, [1, KV_HEADS, past, HEAD_DIM]),
              h.make_tensor_value_info("pv", f, [1, KV_HEADS, past, HEAD_DIM]),
              h.make_tensor_value_info("mask", f, [1, 1, 1, past + 1])]
    opsets = [h.make_opsetid("", 23)]
    if op == "GroupQueryAttention":
        inputs += [h.make_tensor_value_info("seqlens_k", T.INT32, [1]), h.make_tensor_value_info("total", T.INT32, [])]
        opsets.append(h.make_opsetid("com.microsoft", 1))
    outputs = [h.make_tensor_value_info(o, f, None) for o in [q, *outs]]
    return h.make_model(h.make_graph(nodes, op, inputs, outputs), opset_imports=opsets).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, nargs="+", default=[192, 1024])
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {LAYERS} layers per step")
    for past in args.past:
        feeds = {"q": rng.standard_normal((1, 1, Q_HEADS * HEAD_DIM), np.float32),
                 "k": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM), np.float32),
                 "v": rng.standard_normal((1, 1, KV_HEADS * HEAD_DIM), np.float32),
                 "pk": rng.standard_normal((1, KV_HEADS, past, HEAD_DIM), np.float32),
                 "pv": rng.standard_normal((1, KV_HEADS, past, HEAD_DIM), np.float32),
                 "mask": np.zeros((1, 1, 1, past + 1), np.float32)}
        results, times = {}, {}
        for op in ("GroupQueryAttention", "Attention"):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            sess = ort.InferenceSession(graph(op, past), opts, providers=["CPUExecutionProvider"])
            f = dict(feeds)
            if op == "GroupQueryAttention":  # every row full: seqlens_k = total - 1
                f.update(seqlens_k=np.array([past], np.int32), total=np.array(past + 1, np.int32))
            results[op] = sess.run(None, f)[0]
            for _ in range(20):
                sess.run(None, f)
            best = float("inf")
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(args.calls):
                    sess.run(None, f)
                best = min(best, (time.perf_counter() - t) / args.calls)
            times[op] = best
        diff = float(np.abs(results["Attention"] - results["GroupQueryAttention"]).max())
        print(f"past {past}: GroupQueryAttention {times['GroupQueryAttention'] * 1e6:.0f} us, "
              f"Attention {times['Attention'] * 1e6:.0f} us per step "
              f"({times['GroupQueryAttention'] / times['Attention']:.2f}x), max |difference| {diff:.1e}")


if __name__ == "__main__":
    main()
