"""Peak RSS of long prompts in one process, and what the prefill chunking costs in time.

    .venv/bin/python benchmarks/prefill_memory.py ARTIFACT_DIR --prompt-tokens 16384 [--runs 2]
        [--score-budget N] [--portable]

Loads the artifact once, then `--runs` times: drops the last run's state, prefills the
benchmark prompt (gemma_export.runtime.bench.prompt_ids), and takes `--steps` greedy decode
steps, as `bench` and benchmarks/long_context.py do (a warm-up run, then timed ones). After
each run it prints the prefill time, the steps' time, the process's resident memory now
and its peak so far (ru_maxrss). `--score-budget` sets generate.SCORE_BUDGET for this
process (query x key positions of scores a prefill chunk may span), to weigh memory
against prefill time. One process per setting: the peak is a process's high-water mark.
The numbers in docs/design.md ("Memory at long context") came from this measurement.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path, help="artifact directory")
    ap.add_argument("--prompt-tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=16, help="greedy decode steps after each prefill")
    ap.add_argument("--runs", type=int, default=2, help="prefills in this process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--score-budget", type=int, help="generate.SCORE_BUDGET for this process")
    ap.add_argument("--portable", action="store_true", help="the contract-exact graph (bounded window cache)")
    args = ap.parse_args()
    budget = [] if args.score_budget is None else [args.score_budget]
    if min(args.prompt_tokens, args.steps, args.runs, args.threads, *budget) < 1:
        ap.error("--prompt-tokens, --steps, --runs, --threads and --score-budget must be >= 1")

    sys.path.insert(0, str(REPO))
    import numpy as np
    from harness.report import fmt_bytes
    from harness.workers.common import peak_rss

    from gemma_export.errors import GemmaExportError
    from gemma_export.runtime import generate
    from gemma_export.runtime.bench import prompt_ids
    from gemma_export.runtime.generate import decode_one_token, load_generator, prefill

    if args.score_budget is not None:
        generate.SCORE_BUDGET = args.score_budget
    try:
        gen = load_generator(args.artifact, provider="cpu", threads=args.threads, portable=args.portable)
    except GemmaExportError as e:
        sys.exit(f"error: {e}")
    if args.prompt_tokens + args.steps > gen.session.max_length:
        sys.exit(f"error: --prompt-tokens + --steps exceed the context of {gen.session.max_length}")
    ids = prompt_ids(gen.tokenizer, args.prompt_tokens)
    print(f"loaded: RSS {fmt_bytes(rss_now())}; score budget {generate.SCORE_BUDGET}")
    for r in range(args.runs):
        state = None  # noqa: F841 (the last run's cache goes first, as in bench)
        t0 = time.perf_counter()
        state = prefill(gen.session, [ids])
        t1 = time.perf_counter()
        for _ in range(args.steps):
            state = decode_one_token(gen.session, state, np.array([int(np.argmax(state.logits[0]))]))
        t2 = time.perf_counter()
        print(f"run {r}: prefill {t1 - t0:.1f} s, {args.steps} steps {t2 - t1:.2f} s, "
              f"RSS {fmt_bytes(rss_now())}, peak {fmt_bytes(peak_rss())}", flush=True)


if __name__ == "__main__":
    main()
