#!/usr/bin/env python3
"""gemma-export's artifacts beside peer runtimes on the real Gemma 3 270M, on this machine.

    .venv/bin/python benchmarks/run_benchmarks.py                 # install, prepare, measure, write RESULTS.md
    .venv/bin/python benchmarks/run_benchmarks.py --skip-install --only ours genai-int4 llamacpp

Systems (see benchmarks/README.md for what each peer setup does):
  ours-{fp32,int8,int4,gguf}      `gemma-export export` / `quantize`, timed by gemma_export.runtime.bench
  genai-{fp32,int8,int4}          onnxruntime-genai's model builder on the same fp32 weights
  llamacpp-q4_k_m                 llama-cpp-python on the very GGUF file our default model loads
  optimum-{fp32,int8}             Optimum's ONNX export, int8 by its dynamic quantizer
  transformers-fp32               Hugging Face transformers (PyTorch eager) loading the same GGUF:
                                  the reference every system's greedy tokens are compared with

Protocol, the same for every system: batch 1, greedy, the first --prompt-tokens ids of
gemma_export/exporter/data/eval_corpus.txt (<bos> first, our tokenizer) fed as ids (no peer
tokenizes anything), then --new-tokens decode steps with EOS ignored, --threads intra-op
threads. Each (system, round) is one fresh subprocess in the system's own venv: load, one
warm-up run, --repeats timed runs, median; its peak RSS is that process's ru_maxrss.
Rounds interleave (A, B, C, A, B, C, ...) so machine drift hits every system alike; the
reported number is the median over rounds. Agreement with the reference: top-1 agreement
teacher-forced on the reference's tokens (each step is fed the reference's previous token),
and how many of the first 32 free-running greedy tokens equal the reference's.

A step that fails (install, build, run) marks the systems it feeds as failed with one line
of reason in RESULTS.md; it never stops the run. This file is the CLI and the entry of the
worker processes (`run_benchmarks.py _task NAME ARGS.json OUT.json`, run inside each venv);
the parts live in benchmarks/harness/ (systems, runner, report, workers/), which import
nothing but the standard library at module level.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path

from harness.report import fmt_bytes, write_results
from harness.runner import DEV_PY, HERE, Runner, StepFailed, add_quiet_options, dir_size, log, machine_line
from harness.systems import BY_NAME, REFERENCE, SYSTEMS, System
from harness.workers import run_task


def select(only: list[str] | None) -> list[System]:
    if not only:
        return list(SYSTEMS)
    chosen = []
    for s in SYSTEMS:
        if any(o in (s.name, s.family) for o in only):
            chosen.append(s)
    unknown = [o for o in only if o not in BY_NAME and o not in {s.family for s in SYSTEMS}]
    if unknown:
        names = ", ".join([*BY_NAME, *dict.fromkeys(s.family for s in SYSTEMS)])
        raise SystemExit(f"error: unknown system {unknown[0]!r}; known: {names}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=HERE / ".work",
                    help="venvs, artifacts, logs (default benchmarks/.work)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every system")
    ap.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps")
    ap.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each a fresh process per system)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per round after one warm-up")
    ap.add_argument("--skip-install", action="store_true", help="use the venvs already in --work-dir")
    ap.add_argument("--only", nargs="+", metavar="SYSTEM", help="systems or families: " + ", ".join(BY_NAME))
    ap.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="report to write")
    ap.add_argument("--report-only", action="store_true", help="rewrite --results from --work-dir/results.json")
    add_quiet_options(ap, "round")
    ap.add_argument("--run-timeout", type=float, default=1800, help="longest one measurement process may run (s)")
    args = ap.parse_args(argv)
    if min(args.threads, args.new_tokens, args.prompt_tokens, args.rounds, args.repeats) < 1:
        ap.error("--threads, --new-tokens, --prompt-tokens, --rounds and --repeats must be >= 1")
    if args.report_only:
        src = args.work_dir / "results.json"
        if not src.is_file():
            ap.error(f"--report-only: {src} not found (run the benchmarks first)")
        write_results(json.loads(src.read_text()), args.results.resolve())
        log(f"wrote {args.results} from {src}")
        return 0
    if not DEV_PY.exists():
        ap.error(f"{DEV_PY} not found: run `make test` (or the Makefile's venv step) first")
    systems = select(args.only)
    t_start = time.time()
    runner = Runner(args)
    log(f"systems: {', '.join(s.name for s in systems)}; work dir {runner.work}")

    # 1. Install each peer's venv (a failure fails that venv's systems).
    runner.install_venvs(systems)

    # 2. The prompt and the reference tokens (transformers fp32), once, cached.
    prompt: list[int] = []
    ref: list[int] | None = None
    try:
        prompt = runner.run_task("dev", "prompt_ids", {"n": args.prompt_tokens}, "prompt-ids")["ids"]
    except StepFailed as e:
        log(f"cannot make the prompt: {e}")
        for s in systems:
            runner.failures.setdefault(s.name, f"no prompt: {e}")
        systems = []
    ref_cache = runner.work / f"reference-p{args.prompt_tokens}-n{args.new_tokens}.json"
    if prompt:
        if ref_cache.is_file() and json.loads(ref_cache.read_text()).get("prompt_ids") == prompt:
            ref = json.loads(ref_cache.read_text())["tokens"]
        else:
            try:
                r = runner.run_task("dev", "measure_transformers", {
                    "artifact": str(runner.gguf_path()), "prompt_ids": prompt, "new_tokens": args.new_tokens,
                    "threads": args.threads, "repeats": 0, "reference": None, "system": REFERENCE,
                }, "reference", timeout=args.run_timeout)
                ref = r["tokens"]
                ref_cache.write_text(json.dumps({"prompt_ids": prompt, "tokens": ref}))
            except StepFailed as e:
                log(f"no reference tokens: {e}")

    # 3. Build every artifact before measuring anything (so timings never overlap a build).
    ready: list[tuple[System, Path]] = []
    for s in systems:
        if s.name in runner.failures:
            continue
        try:
            path = runner.prepare(s)
            ready.append((s, path))
        except StepFailed as e:
            runner.failures[s.name] = f"prepare failed: {e}"
            log(f"{s.name}: prepare failed: {e}")

    # 4. Interleaved rounds.
    results: dict[str, list[dict]] = {}
    for rnd in range(1, args.rounds + 1):
        for s, path in ready:
            log(f"round {rnd}/{args.rounds}: {s.name}")
            try:
                res = runner.measure(s, path, prompt, ref, rnd)
                res["ok"] = True
                res.setdefault("size_bytes", dir_size(path))
                results.setdefault(s.name, []).append(res)
                log(f"  prefill {res['prefill_s']:.3f} s, decode {res['decode_tps']:.1f} tok/s, "
                    f"RSS {fmt_bytes(res['peak_rss_bytes'])}")
            except StepFailed as e:
                results.setdefault(s.name, []).append({"ok": False, "error": str(e)})
                if not any(r.get("ok") for r in results[s.name]):
                    runner.failures[s.name] = f"run failed: {e}"
                log(f"  failed: {e}")
    for name, rs in results.items():
        if any(r.get("ok") for r in rs):
            runner.failures.pop(name, None)

    # 5. The report.
    wall = time.time() - t_start
    command = "python benchmarks/run_benchmarks.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    notes = [
        "decode tok/s = decode forward passes per second after the prefill (each feeds one token and "
        "yields the next token's logits); prefill = one forward over the prompt up to the first token's logits.",
        "peak RSS = ru_maxrss of the measuring process: it includes each runtime's own imports "
        "(torch for Optimum's ORTModel and for transformers) and, for transformers, loading and dequantizing the GGUF.",
        "artifact size = all files the system loads (ONNX graph + external data + configs/tokenizer; the .gguf file).",
        "top-1 = share of the decode positions where the system's argmax equals the reference's token when fed "
        "the reference's own previous tokens; 'first 32' compares free-running greedy outputs; prefix = tokens "
        "identical before the first difference.",
    ]
    report = {
        "results": results, "reference": ref, "prompt": prompt, "failures": runner.failures,
        "step_notes": {**runner.install_notes, **runner.prep_notes}, "timings": runner.timings,
        "meta": {
            "gguf": runner.gguf_path().name if prompt else "?", "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
            "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_line(),
            "command": command.strip(), "wall_s": wall, "notes": notes,
        },
    }
    (runner.work / "results.json").write_text(json.dumps(report, indent=1))
    write_results(report, args.results.resolve())
    log(f"wrote {args.results} in {wall / 60:.1f} min; failed: {', '.join(runner.failures) or 'none'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_task":
        sys.exit(run_task(sys.argv[2:]))
    sys.exit(main())
