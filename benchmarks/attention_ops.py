"""One decode step of attention three ways, at Gemma 3 270M's shapes, on ONNX Runtime's CPU
provider:

  Attention      ONNX's Attention (opset 23): present = Concat(past, new), a new tensor
  GQA concat     com.microsoft GroupQueryAttention, the same concat contract
  GQA shared     GroupQueryAttention on one buffer per tensor, bound as both past and
                 present: the new position is written in place, nothing else is copied

    .venv/bin/python benchmarks/attention_ops.py [--threads 2] [--past 192 1024] [--fp16]

18 layers chained in one graph as in the model (4 query heads, 1 KV head, head_dim 256),
each layer with its own cache, one new token over a past of P positions, the same additive
mask for all. Prints the time per step of each and the largest difference between their
outputs. This is the measurement behind the attention rule's choice
(exporter/rewrites/attention.py). `--fp16` times each variant a second time with every
tensor in fp16 (cache, q / k / v, mask), interleaved with the fp32 runs: whether a narrower
cache pays on this CPU (issue 16); its difference is against fp32 Attention.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 18, 4, 1, 256
VARIANTS = ("Attention", "GQA concat", "GQA shared")
DTYPES = {"fp32": (T.FLOAT, np.float32), "fp16": (T.FLOAT16, np.float16)}


def graph(variant: str, past: int, capacity: int, dtype: str = "fp32") -> bytes:
    f = DTYPES[dtype][0]
    length = capacity if variant == "GQA shared" else past
    nodes, outs, q = [], [], "q"
    inputs = [h.make_tensor_value_info("q", f, [1, 1, Q_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("k", f, [1, 1, KV_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("v", f, [1, 1, KV_HEADS * HEAD_DIM]),
              h.make_tensor_value_info("mask", f, [1, 1, 1, past + 1]),
              h.make_tensor_value_info("seqlens_k", T.INT32, [1]),
              h.make_tensor_value_info("total", T.INT32, [])]
    for i in range(LAYERS):
        y, pk, pv = f"y{i}", f"pk{i}", f"pv{i}"
        inputs += [h.make_tensor_value_info(n, f, [1, KV_HEADS, length, HEAD_DIM]) for n in (pk, pv)]
        if variant == "Attention":
            nodes.append(h.make_node("Attention", [q, "k", "v", "mask", pk, pv], [y, f"ok{i}", f"ov{i}"],
                                     q_num_heads=Q_HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM**-0.5))
        else:
            ins = [q, "k", "v", pk, pv, "seqlens_k", "total", "", "", "", "mask"]
            nodes.append(h.make_node("GroupQueryAttention", ins, [y, f"ok{i}", f"ov{i}"], domain="com.microsoft",
                                     num_heads=Q_HEADS, kv_num_heads=KV_HEADS, scale=HEAD_DIM**-0.5))
        outs += [f"ok{i}", f"ov{i}"]
        q = y
    outputs = [h.make_tensor_value_info(o, f, None) for o in [q, *outs]]
    opsets = [h.make_opsetid("", 23), h.make_opsetid("com.microsoft", 1)]
    return h.make_model(h.make_graph(nodes, variant, inputs, outputs), opset_imports=opsets).SerializeToString()


def bound(variant: str, past: int, capacity: int, threads: int, dtype: str = "fp32"
          ) -> tuple[ort.InferenceSession, ort.IOBinding]:
    """A session and an IO binding for one step; the shared variant's present outputs are
    bound to the memory of its past inputs, the others let ONNX Runtime allocate them."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(graph(variant, past, capacity, dtype), opts, providers=["CPUExecutionProvider"])
    r = np.random.default_rng(0)  # the same numbers for every variant and dtype
    npt = DTYPES[dtype][1]
    b = sess.io_binding()
    for name, shape in (("q", (1, 1, Q_HEADS * HEAD_DIM)), ("k", (1, 1, KV_HEADS * HEAD_DIM)),
                        ("v", (1, 1, KV_HEADS * HEAD_DIM))):
        b.bind_cpu_input(name, r.standard_normal(shape, np.float32).astype(npt))
    b.bind_cpu_input("mask", np.zeros((1, 1, 1, past + 1), npt))
    b.bind_cpu_input("seqlens_k", np.array([past], np.int32))  # every row full: total - 1
    b.bind_cpu_input("total", np.array(past + 1, np.int32))
    b.bind_output(f"y{LAYERS - 1}", "cpu")
    keep = []
    for i in range(LAYERS):
        for pin, pout in ((f"pk{i}", f"ok{i}"), (f"pv{i}", f"ov{i}")):
            cache = r.standard_normal((1, KV_HEADS, past, HEAD_DIM), np.float32).astype(npt)
            if variant == "GQA shared":
                buf = np.zeros((1, KV_HEADS, capacity, HEAD_DIM), npt)
                buf[:, :, :past] = cache
                v = ort.OrtValue.ortvalue_from_numpy(buf)
                keep.append(buf)
                b.bind_ortvalue_input(pin, v)
                b.bind_ortvalue_output(pout, v)
            else:
                b.bind_cpu_input(pin, cache)
                keep.append(cache)
                b.bind_output(pout, "cpu")
    sess._keep = keep  # the bound numpy memory must outlive the binding
    return sess, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--past", type=int, nargs="+", default=[192, 1024])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--fp16", action="store_true", help="also time every variant with fp16 tensors")
    args = ap.parse_args()
    dtypes = ("fp32", "fp16") if args.fp16 else ("fp32",)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, {LAYERS} layers per step")
    for past in args.past:
        runs, failed = {}, {}
        for d in dtypes:
            for v in VARIANTS:
                try:
                    runs[v, d] = bound(v, past, past + 64, args.threads, d)
                except Exception as e:  # an op without a kernel for this dtype on this provider
                    failed[v, d] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        results, times = {}, {k: float("inf") for k in runs}
        for k, (sess, b) in runs.items():
            sess.run_with_iobinding(b)
            results[k] = b.get_outputs()[0].numpy().astype(np.float32)
        for _ in range(5):  # rounds, interleaved; the best of each
            for k, (sess, b) in runs.items():
                for _ in range(10):
                    sess.run_with_iobinding(b)
                t = time.perf_counter()
                for _ in range(args.calls):
                    sess.run_with_iobinding(b)
                times[k] = min(times[k], (time.perf_counter() - t) / args.calls)
        ref = results["Attention", "fp32"]
        for d in dtypes:
            done = [v for v in VARIANTS if (v, d) in runs]
            diff = max(float(np.abs(results[v, d] - ref).max()) for v in done)
            print(f"past {past}, {d}: " + ", ".join(f"{v} {times[v, d] * 1e6:.0f} us" for v in done)
                  + f" per step; max |difference| from fp32 Attention {diff:.1e}"
                  + "".join(f"; {v}: {failed[v, d]}" for v in VARIANTS if (v, d) in failed))


if __name__ == "__main__":
    main()
