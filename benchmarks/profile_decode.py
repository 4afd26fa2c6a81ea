"""Where a decode step's time goes: ONNX Runtime's profiler over an artifact's graph.

    .venv/bin/python benchmarks/profile_decode.py ARTIFACT/model.onnx [...] [--steps 64]

Prefills the benchmark prompt (the first 128 tokens of the shipped corpus, `<bos>` first),
then runs `--steps` single-token greedy decode steps feeding each step's present.* back as
past_key_values.*, with the profiler on (CPU provider, 2 threads), and prints per op type
the mean kernel time per decode step and its share of the step. The profiler's own
overhead inflates every number (a step takes ~45% longer profiled); read the shares, not
the absolute times. The prompt's run is not counted.

onnxruntime-genai's model.onnx cannot be driven this way: its sliding-window
GroupQueryAttention needs the preallocated, shared KV buffers its own runtime provides.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]


def prompt_ids(n: int) -> np.ndarray:
    sys.path.insert(0, str(REPO))
    from gemma_export.exporter.tokenizer_source import tokenizer_from_gguf
    from gemma_export.models.load import bundled_gguf_path
    from gemma_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_bytes(tokenizer_from_gguf(bundled_gguf_path()))
    text = (REPO / "gemma_export" / "exporter" / "data" / "eval_corpus.txt").read_text(encoding="utf-8")
    return np.array([tok.encode(text, add_bos=True)[:n]], np.int64)


def profile(model: Path, ids: np.ndarray, steps: int, threads: int) -> tuple[dict[str, float], float]:
    """({op type: mean microseconds per decode step}, mean microseconds per step)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    kv_dtype = np.float16 if "float16" in inputs[next(n for n in inputs if n.startswith("past"))].type else np.float32
    past = {name: np.zeros([_dim(d, model) for d in i.shape], kv_dtype)
            for name, i in inputs.items() if name.startswith("past_key_values")}
    tokens, total = ids, 0
    for step in range(steps + 1):
        total += tokens.shape[1]
        feeds = {"input_ids": tokens, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(total - tokens.shape[1], total, dtype=np.int64)[None],
                 "num_logits_to_keep": np.array(1, np.int64), **past}
        out = dict(zip(outputs, sess.run(outputs, {k: v for k, v in feeds.items() if k in inputs})))
        past = {"past_key_values." + n[len("present."):]: v for n, v in out.items() if n.startswith("present.")}
        tokens = out["logits"][:, -1:].argmax(-1).astype(np.int64)
    trace_file = Path(sess.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])[1:]  # not the prompt
    start = runs[0]["ts"]
    per_op: dict[str, float] = collections.defaultdict(float)
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"] / len(runs)
    step_us = sum(r["dur"] for r in runs) / len(runs)
    return dict(per_op), step_us


def _dim(d, model: Path) -> int:
    """An empty past's size along a dim: batch 1, lengths 0, head_dim from config.json."""
    if not isinstance(d, str):
        return d
    if "batch" in d:
        return 1
    if "length" in d or "sequence" in d:
        return 0
    return int(json.loads((model.parent / "config.json").read_text())["head_dim"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ids = prompt_ids(args.prompt_tokens)
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, prompt {ids.shape[1]} tokens, "
          f"{args.steps} decode steps profiled")
    for model in args.models:
        per_op, step_us = profile(model, ids, args.steps, args.threads)
        kernels = sum(per_op.values())
        print(f"\n{model}: {step_us / 1000:.2f} ms per decode step (model_run), kernels {kernels / 1000:.2f} ms, "
              f"outside kernels {(step_us - kernels) / 1000:.2f} ms")
        for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
            if us >= 0.005 * kernels:
                print(f"  {op:34s} {us / 1000:7.3f} ms  {100 * us / step_us:5.1f}%")


if __name__ == "__main__":
    main()
