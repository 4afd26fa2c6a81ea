"""The floor under a quantized graph's decode step: its weight products alone.

    .venv/bin/python benchmarks/products_floor.py DIR [DIR ...] [--rounds 5] [--steps 100] [--threads 2]

For each artifact directory (ours, or any folder holding a `model.onnx` such as
onnxruntime-genai's), takes every MatMulNBits node of the graph with its own weights,
scales and zero points and runs them alone, each fed a random activation row of its real
K (M = 1, what a batch-1 decode step feeds), on ONNX Runtime's CPU provider. The time of
one such run is what a decode step of that graph can never go below with these kernels:
everything else in the step (norms, attention, the executor, the caller's loop) comes
on top. Rounds interleave the artifacts, like run_benchmarks.py; medians are printed.

Compare it with the full decode step `run_benchmarks.py` measures for the same graphs
(ms per token = 1000 / tok/s).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper


def products_only(model_file: Path) -> tuple[bytes, dict[str, np.ndarray], int]:
    """(serialized model of the graph's MatMulNBits nodes alone, feeds, node count)."""
    m = onnx.load(str(model_file))  # weights in memory: the new model embeds what it needs
    inits = {t.name: t for t in m.graph.initializer}
    rng = np.random.default_rng(0)
    nodes, inputs, feeds, used = [], [], {}, []
    for i, n in enumerate(m.graph.node):
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        x = f"x{i}"
        inputs.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, attrs["K"]]))
        feeds[x] = rng.standard_normal((1, attrs["K"])).astype(np.float32)
        nodes.append(helper.make_node("MatMulNBits", [x, *n.input[1:]], [f"y{i}"], domain="com.microsoft", **attrs))
        used += [name for name in n.input[1:] if name and name in inits and name not in used]
    outputs = [helper.make_tensor_value_info(nd.output[0], TensorProto.FLOAT, None) for nd in nodes]
    g = helper.make_graph(nodes, "products", inputs, outputs, [inits[u] for u in used])
    fm = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    fm.ir_version = m.ir_version
    return fm.SerializeToString(), feeds, len(nodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100, help="runs timed per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3  # no warnings about initializers the products do not read
    runs = {}
    for d in args.dirs:
        blob, feeds, count = products_only(d / "model.onnx")
        sess = ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
        for _ in range(10):  # warm-up: prepacking, first touch
            sess.run(None, feeds)
        runs[d] = (sess, feeds, count, [])
    for _ in range(args.rounds):
        for sess, feeds, _, times in runs.values():
            t = time.perf_counter()
            for _ in range(args.steps):
                sess.run(None, feeds)
            times.append((time.perf_counter() - t) / args.steps * 1e3)
    print(f"{'artifact':40s} {'products':>8s} {'ms/step (median)':>17s}  rounds")
    for d, (_, _, count, times) in runs.items():
        print(f"{str(d):40s} {count:8d} {statistics.median(times):17.3f}  {' '.join(f'{t:.2f}' for t in times)}")


if __name__ == "__main__":
    main()
