"""llama.cpp through llama-cpp-python, on the very GGUF file our default model loads."""

from __future__ import annotations

import time
from pathlib import Path

from harness.workers.common import argmax, peak_rss, teacher_forced, timed, versions


def task_measure_llamacpp(a: dict) -> dict:
    """llama-cpp-python's Llama.eval over the ids; greedy = argmax of the last logits."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    t0 = time.perf_counter()
    llm = Llama(model_path=a["artifact"], n_ctx=max(512, len(ids) + n + 8), n_batch=512, n_ubatch=512,
                n_threads=th, n_threads_batch=th, logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0

    vocab = llm.n_vocab()
    ctx = getattr(llm, "ctx", None) or llm._ctx.ctx

    def last_logits():
        # Llama.eval keeps no logits unless logits_all (sampling moved into llama.cpp's
        # sampler); read the last output row from the context, no copy.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(vocab,))

    def run_once():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(n):
            tok = argmax(last_logits())
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, out

    res = timed(run_once, a["repeats"])
    rss = peak_rss()
    def feed(tokens):
        llm.eval(tokens)
        return last_logits()

    def prefill():
        llm.reset()
        return feed(ids)

    tf = teacher_forced(prefill, lambda tok: feed([tok]), a["reference"])
    return {**res, "tf_argmax": tf, "peak_rss_bytes": rss, "load_s": load_s,
            "size_bytes": Path(a["artifact"]).stat().st_size,
            "versions": versions("llama_cpp_python", "numpy")}
