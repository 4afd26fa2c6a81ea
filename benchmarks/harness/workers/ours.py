"""gemma-export's artifacts, run by its own runtime (the dev venv)."""

from __future__ import annotations

from harness.workers.common import teacher_forced, versions


def task_measure_ours(a: dict) -> dict:
    """gemma_export.runtime.bench.bench_artifact for the timing (its own median over repeats);
    teacher forcing afterwards through the same runtime functions."""
    import numpy as np

    from gemma_export.runtime.bench import bench_artifact, prompt_ids
    from gemma_export.runtime.generate import decode_one_token, load_generator, prefill

    ids = a["prompt_ids"]
    portable = bool(a.get("portable"))
    res = bench_artifact(a["artifact"], prompt_tokens=len(ids), new_tokens=a["new_tokens"], threads=a["threads"],
                         repeats=a["repeats"], portable=portable)
    rss = res["peak_rss_bytes"]
    gen = load_generator(a["artifact"], provider="cpu", threads=a["threads"], portable=portable)
    if prompt_ids(gen.tokenizer, len(ids)) != ids:
        raise RuntimeError("the artifact's tokenizer gives another prompt than the shared ids")
    state = None

    def prefill_():
        nonlocal state
        state = prefill(gen.session, [ids])
        return state.logits[0]

    def feed(tok):
        nonlocal state
        state = decode_one_token(gen.session, state, np.array([tok]))
        return state.logits[0]

    tf = teacher_forced(prefill_, feed, a["reference"])
    return {"prefill_s": res["prefill_seconds"], "decode_tps": res["decode_tokens_per_second"],
            "tokens": res["greedy_tokens"], "tf_argmax": tf, "peak_rss_bytes": rss,
            "graph": res["graph"], "kv_cache": res["kv_cache"],
            "versions": versions("gemma-export", "onnxruntime", "numpy")}
