"""Where a decode step's time goes: ONNX Runtime's profiler, per op type.

    .venv/bin/python benchmarks/profile_decode.py ARTIFACT_DIR [...] [--steps 64] [--portable]
    benchmarks/.work/venvs/genai/bin/python benchmarks/profile_decode.py --genai GENAI_DIR [...]

Prefills the benchmark prompt (the first --prompt-tokens of the shipped corpus, repeated
past its end, `<bos>` first; our runtime prefills in chunks, none of them counted),
then runs `--steps` single-token greedy decode steps with the profiler on (CPU provider,
2 threads), and prints per op type the mean kernel time per decode step and its share of
the step, and the time per step outside kernels.

Our artifacts run through the runtime itself (gemma_export.runtime: IO binding, the KV
cache as the artifact's layout wants it), so the profile is of the path `generate` and
`bench` time; `--portable` profiles an artifact's contract-exact sibling graph.
`--genai` profiles onnxruntime-genai's model.onnx through its own runtime (run it with
the genai virtual environment's python, where onnxruntime_genai is installed; the prompt
is its tokenizer's, with `<bos>` put back in front).

The profiler's own overhead inflates every number (a step takes ~45% longer profiled);
compare shares, and absolute times only between runs of this script.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "gemma_export" / "exporter" / "data" / "eval_corpus.txt"


def summarise(trace_file: str, prompt_runs: int = 1) -> tuple[dict[str, float], float, int]:
    """({op type: mean microseconds per decode step}, mean microseconds per step, nodes run
    per step) from a profile, the first `prompt_runs` model_runs (the prompt's) left out."""
    trace = json.loads(Path(trace_file).read_text())
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])[prompt_runs:]
    start = runs[0]["ts"]
    per_op: dict[str, float] = collections.defaultdict(float)
    kernels = 0
    for e in trace:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"] / len(runs)
            kernels += 1
    return dict(per_op), sum(r["dur"] for r in runs) / len(runs), kernels // len(runs)


def profile_ours(artifact: Path, n_prompt: int, steps: int, threads: int, portable: bool) -> tuple[str, int]:
    """(trace file, model_runs of the prompt: its chunks)."""
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    from gemma_export.runtime.bench import prompt_ids
    from gemma_export.runtime.generate import decode_one_token, prefill
    from gemma_export.runtime.session import DecoderSession
    from gemma_export.runtime.tokenizer import Tokenizer

    sess = DecoderSession(artifact, provider="cpu", threads=threads, portable=portable)
    tokenizer = Tokenizer.from_file(artifact / sess.manifest.tokenizer)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    opts.log_severity_level = 3
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "decode")
    sess.session = ort.InferenceSession(str(sess.model_path), opts, providers=["CPUExecutionProvider"])
    # The prompt's forwards, counted rather than derived: chunks shrink as the context grows
    # (generate.chunk_at).
    forward, prompt_runs = sess.forward, 0

    def counted(*a, **k):
        nonlocal prompt_runs
        prompt_runs += 1
        return forward(*a, **k)

    sess.forward = counted
    state = prefill(sess, [prompt_ids(tokenizer, n_prompt)], capacity=n_prompt + steps + 1)
    sess.forward = forward
    for _ in range(steps):
        state = decode_one_token(sess, state, np.array([int(np.argmax(state.logits[0]))]))
    return sess.session.end_profiling(), prompt_runs


def profile_genai(artifact: Path, n_prompt: int, steps: int, threads: int) -> tuple[str, int]:
    import onnxruntime_genai as og

    out = Path(tempfile.mkdtemp())
    config = og.Config(str(artifact.resolve()))
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1, "enable_profiling": str(out / "decode")}}}}))
    model = og.Model(config)
    bos = json.loads((artifact / "genai_config.json").read_text())["model"]["bos_token_id"]
    ids = [bos] + [int(t) for t in og.Tokenizer(model).encode(CORPUS.read_text(encoding="utf-8"))][: n_prompt - 1]
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max(512, n_prompt + steps + 2), batch_size=1)
    g = og.Generator(model, params)
    g.append_tokens(ids)
    for _ in range(steps + 1):  # the first call samples from the prompt's logits
        g.generate_next_token()
    cwd = os.getcwd()
    del g, params, model  # the profile is written when the session closes
    found = sorted(glob.glob(str(out / "decode*.json"))) or sorted(glob.glob(os.path.join(cwd, "decode*.json")))
    return found[-1], 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", type=Path)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--portable", action="store_true", help="profile the artifact's contract-exact sibling graph")
    ap.add_argument("--genai", action="store_true", help="the artifacts are onnxruntime-genai model folders")
    args = ap.parse_args()
    print(f"{args.threads} threads, prompt {args.prompt_tokens} tokens, {args.steps} decode steps profiled")
    for a in args.artifacts:
        trace, prompt_runs = (profile_genai(a, args.prompt_tokens, args.steps, args.threads) if args.genai
                              else profile_ours(a, args.prompt_tokens, args.steps, args.threads, args.portable))
        per_op, step_us, nodes = summarise(trace, prompt_runs)
        Path(trace).unlink()
        kernels = sum(per_op.values())
        print(f"\n{a}: {step_us / 1000:.2f} ms per decode step (model_run), {nodes} nodes, "
              f"kernels {kernels / 1000:.2f} ms, outside kernels {(step_us - kernels) / 1000:.2f} ms")
        for op, us in sorted(per_op.items(), key=lambda kv: -kv[1]):
            if us >= 0.005 * kernels:
                print(f"  {op:34s} {us / 1000:7.3f} ms  {100 * us / step_us:5.1f}%")


if __name__ == "__main__":
    main()
