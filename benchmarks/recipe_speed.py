#!/usr/bin/env python3
"""Two recipes of one precision side by side: `gemma-export bench` on each artifact, rounds
interleaved (A, B, A, B, ...), each run a fresh process; medians and the ratio of each
artifact to the first of its pair.

    .venv/bin/python benchmarks/recipe_speed.py --pair BEFORE_INT8 NOW_INT8 --pair BEFORE_GGUF NOW_GGUF

Used for issue 17's "at no more than 10% decode-speed cost against today's graphs": the
pairs are the int8 / gguf artifacts without and with the fidelity changes (how they were
made is in docs/design.md "Outlier channels").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

from harness.runner import DEV_PY, machine_line

GEMMA_EXPORT = DEV_PY.parent / "gemma-export"


def bench(artifact: Path, args: argparse.Namespace) -> dict:
    cmd = [str(GEMMA_EXPORT), "bench", str(artifact), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", nargs=2, type=Path, action="append", required=True, metavar=("BEFORE", "AFTER"),
                    help="two artifact directories of one precision")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per bench after its warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for a in (p for pair in args.pair for p in pair):
        if not (a / "manifest.json").is_file():
            ap.error(f"{a}: not an artifact (no manifest.json)")
    order = [p for pair in args.pair for p in pair]
    runs: dict[Path, list[dict]] = {a: [] for a in order}
    for r in range(args.rounds):
        for a in order:
            res = bench(a, args)
            runs[a].append(res)
            print(f"round {r + 1}: {a}: decode {res['decode_tokens_per_second']} tok/s, "
                  f"prefill {res['prefill_seconds']} s", file=sys.stderr, flush=True)
    print(f"Run {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {machine_line()}.\n")
    print(f"Command: `python benchmarks/recipe_speed.py {shlex.join(sys.argv[1:] if argv is None else argv)}`; "
          f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, {args.threads} threads, "
          f"{args.rounds} interleaved rounds of {args.repeats} timed runs.\n")
    print("| artifact | decode tok/s (median; rounds) | prefill s | size | decode ÷ first of pair |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for before, after in args.pair:
        base = statistics.median(x["decode_tokens_per_second"] for x in runs[before])
        for a in (before, after):
            d = [x["decode_tokens_per_second"] for x in runs[a]]
            pf = statistics.median(x["prefill_seconds"] for x in runs[a])
            print(f"| {a} | {statistics.median(d):.1f} ({', '.join(f'{x:.1f}' for x in d)}) | {pf:.3f} | "
                  f"{runs[a][0]['size_bytes'] / 1e6:.0f} MB | {statistics.median(d) / base:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
