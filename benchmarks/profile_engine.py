"""Where the serving engine's time goes under N concurrent streams (no HTTP).

    .venv/bin/python benchmarks/profile_engine.py ARTIFACT [--streams 16] [--requests 2]

Runs `streams` x `requests` greedy requests of `--new-tokens` (ignore_eos) after ~128-token
prompts from the shipped corpus through `server.engine.Engine`, with every request
submitted up front and `streams` rows running at once, as serve_bench.py's clients keep
them. It wraps DecoderSession.forward / merge_caches / select_rows and runtime sampling
with timers and prints each one's share of the wall time: decode forwards (by batch
size), prefill forwards, cache copies on join / leave, sampling, and the rest (Python
bookkeeping). Same machine, threads and artifact as serve_bench.py; one process.
"""

from __future__ import annotations

import argparse
import collections
import threading
import time
from pathlib import Path

import numpy as np

from gemma_export.contract import CORPUS
from gemma_export.runtime import generate as gen_mod
from gemma_export.runtime.generate import SamplingConfig, load_generator
from gemma_export.runtime.session import DecoderSession
from gemma_export.server import engine as engine_mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="requests per stream")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    g = load_generator(a.artifact, provider="cpu", threads=a.threads)
    ids = g.tokenizer.encode(CORPUS.read_text(encoding="utf-8"), add_bos=False)
    prompts = [[g.session.config["bos_token_id"]] + ids[i * 97: i * 97 + a.prompt_tokens - 1]
               for i in range(a.streams * a.requests)]

    spent: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()

    def timed(name_of, fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                name = name_of(*args, **kw)
                spent[name] += time.perf_counter() - t
                calls[name] += 1
        return wrapper

    def forward_name(self, input_ids, *rest, **kw):
        kind = "prefill" if input_ids.shape[1] > 1 else "decode"
        return f"forward {kind} B={input_ids.shape[0]:>2}" if kind == "decode" else "forward prefill"

    DecoderSession.forward = timed(forward_name, DecoderSession.forward)
    DecoderSession.merge_caches = timed(lambda *a, **k: "cache copy (merge / select)", DecoderSession.merge_caches)
    engine_mod.sample = timed(lambda *a, **k: "sampling", gen_mod.sample)

    eng = engine_mod.Engine(g.session, g.tokenizer, max_batch=a.streams, max_queue=len(prompts))
    eng.start()
    done = threading.Semaphore(0)
    pending = collections.deque(prompts)
    cfg = SamplingConfig(max_new_tokens=a.new_tokens, ignore_eos=True)
    tokens = 0

    def on_event(ev):
        nonlocal tokens
        if ev.finish_reason is not None:
            tokens += ev.completion_tokens
            done.release()

    t0 = time.perf_counter()
    for _ in range(a.streams):  # each stream sends its next request when the last one ends
        eng.submit(pending.popleft(), cfg, on_event)
    for _ in range(len(prompts)):
        done.acquire()
        if pending:
            eng.submit(pending.popleft(), cfg, on_event)
    wall = time.perf_counter() - t0
    eng.stop()

    print(f"{a.artifact.name}: {a.streams} streams x {a.requests} requests, {tokens} tokens in {wall:.1f} s "
          f"= {tokens / wall:.1f} tok/s ({a.threads} threads)")
    accounted = 0.0
    for name in sorted(spent, key=lambda n: -spent[n]):
        # merge_caches is also reached through select_rows: counted once, under its own name
        accounted += spent[name]
        per = spent[name] / calls[name] * 1000
        print(f"  {name:<30} {spent[name]:7.2f} s  {100 * spent[name] / wall:5.1f}%  {calls[name]:6d} calls  "
              f"{per:8.2f} ms each")
    print(f"  {'rest (engine bookkeeping)':<30} {wall - accounted:7.2f} s  {100 * (wall - accounted) / wall:5.1f}%")
    decode = {n: (spent[n], calls[n]) for n in spent if n.startswith("forward decode")}
    steps = sum(c for _, c in decode.values())
    print(f"  decode steps {steps}; mean rows per step "
          f"{sum(int(n.split('=')[1]) * c for n, (_, c) in decode.items()) / max(steps, 1):.1f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
