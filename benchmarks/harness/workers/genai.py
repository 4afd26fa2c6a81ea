"""onnxruntime-genai: its model builder (fp32 / int8 / int4 for CPU) and its own generate loop."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from harness.workers.common import peak_rss, teacher_forced, timed, versions


def task_genai_build(a: dict) -> dict:
    """onnxruntime-genai's model builder, fp32 / int8 / int4 for CPU. First as shipped; if
    that fails on Gemma 3's RoPE config (transformers 5 nests rope_parameters per layer type,
    the builder reads a flat `rope_type`), once more with the config flattened in memory
    (rope_theta 1e6 global, rope_local_base_freq 1e4) - the only change."""
    import contextlib
    import io

    import onnxruntime_genai.models.builder as b  # noqa: F401  (adds the builder dir to sys.path)

    def build(fix: bool):
        kw = b.parse_extra_options(None, a["hf_dir"], a["out"], a["precision"], "cpu", a["cache"], None)
        cfg = kw["hf_details"]["hf_config"]
        rp = getattr(cfg, "rope_parameters", None)
        if fix and isinstance(rp, dict) and "full_attention" in rp:
            cfg.rope_parameters = dict(rp["full_attention"])
            cfg.rope_theta = rp["full_attention"]["rope_theta"]
            cfg.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        b.create_model(None, a["hf_dir"], a["out"], a["precision"], "cpu", a["cache"], **kw)

    note = ""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            build(fix=False)
    except Exception as e:  # the builder raises whatever its model code raises
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        if "rope" not in first:
            raise
        print(buf.getvalue()[-4000:])
        print(f"builder as shipped failed: {first}; retrying with the flattened RoPE config", flush=True)
        note = (f"the builder as shipped fails on this Gemma 3 config under transformers "
                f"{versions('transformers').get('transformers')} ({first}); the artifacts were built with "
                "the same builder after flattening the in-memory config's rope_parameters to the global entry "
                "and setting rope_theta=1e6, rope_local_base_freq=1e4")
        shutil.rmtree(a["out"], ignore_errors=True)
        build(fix=True)
    shutil.rmtree(a["cache"], ignore_errors=True)
    return {"note": note, "files": sorted(os.listdir(a["out"]))}


def task_measure_genai(a: dict) -> dict:
    """onnxruntime-genai's own loop: append_tokens (prefill), generate_next_token (greedy in C++)."""
    import onnxruntime_genai as og

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    t0 = time.perf_counter()
    config = og.Config(a["artifact"])
    config.clear_providers()  # CPU
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": th, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    load_s = time.perf_counter() - t0
    model_cfg = json.loads((Path(a["artifact"]) / "genai_config.json").read_text())["model"]
    context = model_cfg.get("context_length", 0)
    # n forwards after the prefill put len(ids) + n + 1 tokens in the sequence (the last
    # forward's pick included); a run that fills the whole context (prompt + n = context,
    # long_context.py's 32k row) has room for n - 1 forwards only, and is timed on those.
    forwards = n - 1 if context and len(ids) + n + 1 > context else n
    total = len(ids) + forwards + 1
    # The builder's sliding-window GroupQueryAttention refuses a KV cache shorter than the
    # window (512), so max_length is at least the window; the loops stop after n tokens.
    window = model_cfg["decoder"].get("sliding_window", {}).get("window_size", 0)

    def new_generator():
        params = og.GeneratorParams(model)
        # min_length keeps EOS from ending the run early (it only masks EOS until then).
        params.set_search_options(do_sample=False, max_length=max(total, window), min_length=total, batch_size=1)
        return og.Generator(model, params)

    def run_once():
        g = new_generator()
        t0 = time.perf_counter()
        g.append_tokens(ids)  # prefill: runs the model over the prompt
        t1 = time.perf_counter()
        for _ in range(forwards + 1):
            # The first call picks token 1 from the prefill's logits; each later call runs one
            # decode forward and picks the next: `forwards` of them (n but at the context's end),
            # like the other systems' loops.
            g.generate_next_token()
        t2 = time.perf_counter()
        seq = list(g.get_sequence(0))
        return t1 - t0, t2 - t1, forwards, [int(x) for x in seq[len(ids):len(ids) + n]]

    res = timed(run_once, a["repeats"])
    rss = peak_rss()
    g = None

    def feed(tokens):
        g.append_tokens(tokens)
        return g.get_logits()

    def prefill():
        nonlocal g
        g = new_generator()
        return feed(ids)

    tf = teacher_forced(prefill, lambda tok: feed([tok]), a["reference"])
    return {**res, "tf_argmax": tf, "peak_rss_bytes": rss, "load_s": load_s,
            "versions": versions("onnxruntime-genai", "onnxruntime", "numpy")}
