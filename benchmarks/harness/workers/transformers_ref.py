"""The reference: Hugging Face transformers (PyTorch eager) loading the same GGUF."""

from __future__ import annotations

import time
from pathlib import Path

from harness.workers.common import peak_rss, timed, versions


def task_measure_transformers(a: dict) -> dict:
    """The reference: transformers loading the same GGUF, fp32, eager PyTorch, DynamicCache."""
    import torch
    from transformers import AutoModelForCausalLM

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    torch.set_num_threads(th)
    gguf = Path(a["artifact"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids], dtype=torch.long)

    @torch.inference_mode()
    def run_once():
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        toks = []
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
            out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, toks

    res = timed(run_once, a["repeats"])
    return {**res, "tf_argmax": [], "peak_rss_bytes": peak_rss(), "load_s": load_s, "size_bytes": gguf.stat().st_size,
            "versions": versions("transformers", "torch", "gguf")}
