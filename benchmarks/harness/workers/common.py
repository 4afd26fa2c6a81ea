"""What every worker shares: timing runs, the teacher-forced top-1 loop, peak RSS, versions."""

from __future__ import annotations

import statistics
from typing import Any, Callable


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def argmax(x) -> int:
    import numpy as np

    return int(np.argmax(np.asarray(x).reshape(-1)))


def timed(run_once, repeats: int) -> dict:
    """run_once() -> (prefill_s, decode_s, forwards, tokens). Run 0 warms up; medians of the rest."""
    prefills, rates, tokens = [], [], None
    for r in range(repeats + 1):
        p, d, forwards, toks = run_once()
        tokens = toks
        if r or repeats == 0:
            prefills.append(p)
            rates.append(forwards / d)
    return {"prefill_s": statistics.median(prefills), "decode_tps": statistics.median(rates), "tokens": tokens,
            "runs": [(round(a, 4), round(b, 2)) for a, b in zip(prefills, rates)]}


def teacher_forced(prefill: Callable[[], Any], feed: Callable[[int], Any], reference: list[int] | None) -> list[int]:
    """The system's argmax at each decode position when fed the reference's own previous
    tokens: `prefill()` runs the prompt and returns its last logits, `feed(token)` runs one
    token and returns its logits. [] without a reference."""
    tf: list[int] = []
    if not reference:
        return tf
    logits = prefill()
    for tok in reference:
        tf.append(argmax(logits))
        logits = feed(tok)
    return tf
