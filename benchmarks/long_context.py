#!/usr/bin/env python3
"""Decode speed, prefill time and peak RSS of the real Gemma 3 270M at long contexts,
gemma-export beside llama.cpp and onnxruntime-genai, interleaved in one run.

    .venv/bin/python benchmarks/long_context.py --skip-install                # 512, 4k, 16k, 32k
    .venv/bin/python benchmarks/long_context.py --contexts 512 4096 --only ours-int4-portable llamacpp-q4_k_m

Each context is a prompt of N tokens (the shipped corpus, repeated past its 7438 tokens:
gemma_export.runtime.bench.prompt_ids), then --new-tokens greedy steps; 32768 stands for the
270M's whole context (prompt + new tokens = 32768). Systems and their setup are
run_benchmarks.py's (same --work-dir, venvs and artifacts); the same protocol: batch 1, ids
fed to every system, one fresh process per (system, context, round), one warm-up run,
--repeats timed runs, median; peak RSS is that process's ru_maxrss. Rounds interleave every
system at every context. No reference tokens at these lengths (transformers would need the
whole prompt's attention scores at once): this run measures speed, and the parity past the
window is tests/runtime/test_long_context.py's.

Systems:
  ours-int4                 the int4 artifact's default CPU graph (fused, shared in-place cache:
                            every layer keeps every position)
  ours-{int4,int8,gguf}-portable   the contract-exact graph, whose sliding layers' cache the
                            runtime bounds to their window on CPU
  llamacpp-q4_k_m           llama-cpp-python on the very GGUF file our model loads
  genai-int4                onnxruntime-genai's own int4 build and loop
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from harness.report import fmt_bytes
from harness.runner import DEV_PY, HERE, Runner, StepFailed, add_quiet_options, log, machine_line
from harness.systems import BY_NAME, System

CONTEXT = 32768  # Gemma 3 270M's max_position_embeddings


def _portable(name: str) -> System:
    base = BY_NAME[name]
    return replace(base, name=f"{name}-portable", precision=f"{base.precision}, portable graph",
                   label="gemma-export (bounded window cache)", artifact_of=name, portable=True)


SYSTEMS: dict[str, System] = {s.name: s for s in (
    replace(BY_NAME["ours-int4"], label="gemma-export (fused graph, full cache)"),
    _portable("ours-int4"), _portable("ours-int8"), _portable("ours-gguf"),
    BY_NAME["llamacpp-q4_k_m"], BY_NAME["genai-int4"],
)}
DEFAULT_CONTEXTS = (512, 4096, 16384, CONTEXT)
# Issue 16's targets: against llama.cpp on the same GGUF (our gguf artifact), against genai
# at the same precision (int4). (what, our system, peer, context, metric, ratio wanted, higher is better)
GGUF, INT4 = "ours-gguf-portable", "ours-int4-portable"
TARGETS = (
    *((f"decode tok/s at {n}, ours (gguf) ÷ llama.cpp", GGUF, "llamacpp-q4_k_m", n, "decode_tps", 1.3, True)
      for n in (4096, 16384, CONTEXT)),
    *((f"decode tok/s at {n}, ours (int4) ÷ onnxruntime-genai", INT4, "genai-int4", n, "decode_tps", 1.5, True)
      for n in (4096, 16384, CONTEXT)),
    ("peak RSS at 32k, ours (gguf) ÷ llama.cpp", GGUF, "llamacpp-q4_k_m", CONTEXT, "peak_rss_bytes", 1.0, False),
    ("prefill time at 16k, ours (gguf) ÷ llama.cpp", GGUF, "llamacpp-q4_k_m", 16384, "prefill_s", 1.0, False),
)


def prompt_length(context: int, new_tokens: int) -> int:
    """Prompt tokens for a context: the whole context minus the new tokens at the model's
    limit, else the context itself."""
    return context - new_tokens if context + new_tokens > CONTEXT else context


def summarize(rounds: list[dict]) -> dict | None:
    ok = [r for r in rounds if r.get("ok")]
    if not ok:
        return None
    return {k: statistics.median(r[k] for r in ok) for k in ("prefill_s", "decode_tps", "peak_rss_bytes")} | {
        "decode_range": (min(r["decode_tps"] for r in ok), max(r["decode_tps"] for r in ok)),
        "rounds": len(ok), "other_cores": max(r.get("other_cores_during", 0.0) for r in ok)}


def write_report(report: dict, path: Path, chart: Path) -> None:
    meta, res = report["meta"], report["results"]
    summ = {(s, int(n)): summarize(rs) for s, by in res.items() for n, rs in by.items()}
    lines = [
        "# Long context: decode, prefill and memory at 512 to 32k tokens", "",
        f"Run {meta['date']} on {meta['machine']}.", "",
        f"Command: `{meta['command']}` ({meta['wall_s'] / 60:.0f} min).", "",
        f"Batch 1, {meta['threads']} threads, {meta['new_tokens']} greedy tokens after the prompt, "
        f"{meta['rounds']} interleaved round(s) x {meta['repeats']} timed run(s) after a warm-up; medians. "
        "The prompt is the shipped corpus repeated (benchmarks/long_context.py docstring); "
        f"at {CONTEXT} the prompt is {prompt_length(CONTEXT, meta['new_tokens'])} tokens so that prompt + new "
        "tokens fill the model's context.", "",
        "| context | system | precision | prefill s | decode tok/s | peak RSS |",
        "| ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for n in meta["contexts"]:
        for name in meta["systems"]:
            s = summ.get((name, n))
            sysd = SYSTEMS[name]
            if s is None:
                why = report["failures"].get(name) or next(
                    (r.get("error", "") for r in res.get(name, {}).get(str(n), []) if not r.get("ok")), "")
                lines.append(f"| {n} | {sysd.label} | {sysd.precision} | {f'failed: {why}' if why else 'not run'} "
                             "| | |")
                continue
            lo, hi = s["decode_range"]
            rng = f" ({lo:.1f}-{hi:.1f})" if s["rounds"] > 1 else ""
            lines.append(f"| {n} | {sysd.label} | {sysd.precision} | {s['prefill_s']:.2f} | "
                         f"{s['decode_tps']:.1f}{rng} | {fmt_bytes(s['peak_rss_bytes'])} |")
    lines += ["", "## Targets (ratios within this run)", "",
              "| target | measured | wanted | met |", "| --- | ---: | ---: | --- |"]
    for what, ours, peer, n, key, want, higher in TARGETS:
        a, b = summ.get((ours, n)), summ.get((peer, n))
        if n not in meta["contexts"] or a is None or b is None:
            lines.append(f"| {what} | not measured | {want} | - |")
            continue
        ratio = a[key] / b[key]
        met = ratio >= want if higher else ratio <= want
        lines.append(f"| {what} | {ratio:.2f} | {'>=' if higher else '<='} {want} | {'yes' if met else 'NO'} |")
    lines += ["", f"![decode tok/s against context]({chart.name})", ""]
    path.write_text("\n".join(lines))
    _chart(summ, meta, chart)


def _chart(summ: dict, meta: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in meta["systems"]:
        pts = [(n, summ[(name, n)]["decode_tps"]) for n in meta["contexts"] if summ.get((name, n))]
        if pts:
            ax.plot([n for n, _ in pts], [y for _, y in pts], marker="o",
                    label=f"{SYSTEMS[name].label}, {SYSTEMS[name].precision}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(meta["contexts"], [str(n) for n in meta["contexts"]])
    ax.set_xlabel("context (prompt tokens)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Gemma 3 270M, {meta['threads']} threads, batch 1 ({meta['date'][:10]})", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=HERE / ".work", help="run_benchmarks.py's work dir")
    ap.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), help="prompt lengths")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads for every system")
    ap.add_argument("--new-tokens", type=int, default=64, help="greedy decode steps after the prompt")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per round after one warm-up")
    ap.add_argument("--skip-install", action="store_true", help="use the venvs already in --work-dir")
    ap.add_argument("--only", nargs="+", metavar="SYSTEM", choices=list(SYSTEMS), help=", ".join(SYSTEMS))
    ap.add_argument("--results", type=Path, default=HERE / "LONG_CONTEXT.md", help="report to write")
    ap.add_argument("--chart", type=Path, default=HERE / "long_context.png", help="chart to write")
    add_quiet_options(ap, "measurement")
    ap.add_argument("--run-timeout", type=float, default=3600, help="longest one measurement process may run (s)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite --results and --chart from --work-dir/long_context.json")
    args = ap.parse_args(argv)
    if args.report_only:
        src = args.work_dir / "long_context.json"
        if not src.is_file():
            ap.error(f"--report-only: {src} not found (run the benchmark first)")
        write_report(json.loads(src.read_text()), args.results.resolve(), args.chart.resolve())
        log(f"wrote {args.results} and {args.chart} from {src}")
        return 0
    if min(args.threads, args.new_tokens, args.rounds, args.repeats, *args.contexts) < 1:
        ap.error("--threads, --new-tokens, --rounds, --repeats and --contexts must be >= 1")
    if max(prompt_length(n, args.new_tokens) + args.new_tokens for n in args.contexts) > CONTEXT:
        ap.error(f"a context plus --new-tokens exceeds the model's {CONTEXT}")
    if not DEV_PY.exists():
        ap.error(f"{DEV_PY} not found: run `make test` (or the Makefile's venv step) first")
    systems = [SYSTEMS[n] for n in (args.only or SYSTEMS)]
    contexts = sorted(set(args.contexts))
    t_start = time.time()
    runner = Runner(args)
    log(f"systems: {', '.join(s.name for s in systems)}; contexts {contexts}; work dir {runner.work}")

    runner.install_venvs(systems)
    prompts = {}
    for n in contexts:
        prompts[n] = runner.run_task("dev", "prompt_ids", {"n": prompt_length(n, args.new_tokens)},
                                     f"prompt-ids-{n}")["ids"]
    ready: list[tuple[System, Path]] = []
    for s in systems:
        if s.name in runner.failures:
            continue
        try:
            ready.append((s, runner.prepare(s)))
        except StepFailed as e:
            runner.failures[s.name] = f"prepare failed: {e}"

    command = "python benchmarks/long_context.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    results: dict[str, dict[str, list[dict]]] = {}

    def save() -> None:
        """The report so far, after every measurement: a run stopped early keeps what it measured."""
        report = {
            "results": results, "failures": runner.failures,
            "meta": {"contexts": contexts, "systems": [s.name for s in systems], "new_tokens": args.new_tokens,
                     "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                     "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                     "machine": machine_line(), "command": command.strip(), "wall_s": time.time() - t_start},
        }
        (runner.work / "long_context.json").write_text(json.dumps(report, indent=1))
        write_report(report, args.results.resolve(), args.chart.resolve())

    for rnd in range(1, args.rounds + 1):
        for n in contexts:
            for s, path in ready:
                log(f"round {rnd}/{args.rounds}, context {n}: {s.name}")
                try:
                    res = runner.measure(s, path, prompts[n], None, rnd, tag=f"-c{n}") | {"ok": True}
                    log(f"  prefill {res['prefill_s']:.2f} s, decode {res['decode_tps']:.1f} tok/s, "
                        f"RSS {fmt_bytes(res['peak_rss_bytes'])}")
                except StepFailed as e:
                    res = {"ok": False, "error": str(e)}
                    log(f"  failed: {e}")
                results.setdefault(s.name, {}).setdefault(str(n), []).append(res)
                save()
    save()
    log(f"wrote {args.results} and {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
