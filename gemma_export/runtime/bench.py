"""Speed of an artifact on this machine: prefill time and decode tokens/s at batch 1,
greedy, a fixed prompt length, and the process's peak RSS. No torch.

    bench_artifact(dir, prompt_tokens=128, new_tokens=128, threads=2)

The prompt is taken from the shipped evaluation corpus (real text, so the model decodes
as it would in use). Runs are repeated and the median reported; the first run warms up.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from gemma_export.contract import CORPUS
from gemma_export.errors import RuntimeConfigError
from gemma_export.runtime.generate import decode_one_token, load_generator, prefill



def prompt_ids(tokenizer, n: int) -> list[int]:
    """The first n tokens of the corpus, <bos> first; past its end, the corpus again after a
    blank line, as often as n needs (long-context runs: 32k tokens is the 270M's context)."""
    text = CORPUS.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_bos=True)
    if len(ids) < n:
        ids = tokenizer.encode("\n\n".join([text] * (n // len(ids) + 1)), add_bos=True)
    return ids[:n]


def bench_artifact(
    artifact: Path | str,
    *,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    threads: int | None = 2,
    provider: str = "cpu",
    repeats: int = 3,
    portable: bool = False,
    full_cache: bool = False,
) -> dict[str, Any]:
    if prompt_tokens < 1 or new_tokens < 1 or repeats < 1:
        raise RuntimeConfigError("--prompt-tokens, --new-tokens and --repeats must be >= 1")
    gen = load_generator(artifact, provider=provider, threads=threads, portable=portable, full_cache=full_cache)
    sess = gen.session
    if prompt_tokens + new_tokens > sess.max_length:
        raise RuntimeConfigError(f"prompt + new tokens exceed the context of {sess.max_length}")
    ids = prompt_ids(gen.tokenizer, prompt_tokens)
    prefills, decodes, tokens = [], [], None
    for r in range(repeats + 1):  # run 0 warms up (allocations, kernels' first touch)
        state = None  # the last run's cache goes before this one's is built: peak RSS is one run's
        t0 = time.perf_counter()
        state = prefill(sess, [ids], capacity=prompt_tokens + new_tokens)
        t1 = time.perf_counter()
        out = []
        for _ in range(new_tokens):
            tok = int(np.argmax(state.logits[0]))
            out.append(tok)
            state = decode_one_token(sess, state, np.array([tok]))
        t2 = time.perf_counter()
        if r:
            prefills.append(t1 - t0)
            decodes.append(new_tokens / (t2 - t1))
        tokens = out
    return {
        "artifact": str(artifact),
        "precision": sess.manifest.precision.value,
        "provider": sess.provider.value,
        "graph": sess.model_path.name,
        # sliding layers' entries bounded to their window (portable graph on CPU) or all full
        "kv_cache": "bounded" if any(k is not None for k in sess.kv_keep) else "full",
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "prefill_seconds": round(statistics.median(prefills), 4),
        "decode_tokens_per_second": round(statistics.median(decodes), 2),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "size_bytes": sess.manifest.size_bytes(),
        "greedy_tokens": tokens,
    }
