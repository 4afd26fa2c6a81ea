"""Optimum: its ONNX export (optimum-cli, run by the runner), its dynamic int8 quantizer, and
ORTModelForCausalLM's forward with past_key_values fed back."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from harness.workers.common import peak_rss, teacher_forced, timed, versions


def task_optimum_quantize(a: dict) -> dict:
    """Optimum's dynamic int8 quantization (ORTQuantizer), the config for this CPU's ISA."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" in flags:
        qc, isa = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False), "avx512_vnni"
    elif "avx512f" in flags:
        qc, isa = AutoQuantizationConfig.avx512(is_static=False, per_channel=False), "avx512"
    else:
        qc, isa = AutoQuantizationConfig.avx2(is_static=False, per_channel=False), "avx2"
    q = ORTQuantizer.from_pretrained(a["src"], file_name="model.onnx")
    q.quantize(save_dir=a["out"], quantization_config=qc)
    src = Path(a["src"])
    for f in src.iterdir():  # config, tokenizer: what ORTModelForCausalLM reads beside the graph
        if f.suffix in (".json", ".model", ".txt") and not (Path(a["out"]) / f.name).exists():
            shutil.copy(f, a["out"])
    return {"note": f"AutoQuantizationConfig.{isa}(is_static=False, per_channel=False)",
            "files": sorted(os.listdir(a["out"]))}


def task_measure_optimum(a: dict) -> dict:
    """Optimum's ORTModelForCausalLM forward, past_key_values fed back (what its generate does)."""
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    ids, n, th = a["prompt_ids"], a["new_tokens"], a["threads"]
    torch.set_num_threads(th)
    d = Path(a["artifact"])
    file_name = "model_quantized.onnx" if (d / "model_quantized.onnx").exists() else "model.onnx"
    so = ort.SessionOptions()
    so.intra_op_num_threads = th
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(str(d), file_name=file_name, provider="CPUExecutionProvider",
                                                session_options=so, use_cache=True, use_io_binding=False)
    load_s = time.perf_counter() - t0
    x = torch.tensor([ids], dtype=torch.long)

    @torch.inference_mode()
    def forward(tok_ids, past, total):
        return model(input_ids=tok_ids, attention_mask=torch.ones((1, total), dtype=torch.long),
                     past_key_values=past, use_cache=True)

    @torch.inference_mode()
    def run_once():
        t0 = time.perf_counter()
        out = forward(x, None, len(ids))
        t1 = time.perf_counter()
        toks = []
        for i in range(n):
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
            out = forward(torch.tensor([[tok]]), out.past_key_values, len(ids) + i + 1)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, n, toks

    res = timed(run_once, a["repeats"])
    rss = peak_rss()
    out, total = None, len(ids)

    def prefill_():
        nonlocal out
        out = forward(x, None, total)
        return out.logits[0, -1]

    def feed(tok):
        nonlocal out, total
        total += 1
        out = forward(torch.tensor([[tok]]), out.past_key_values, total)
        return out.logits[0, -1]

    with torch.inference_mode():
        tf = teacher_forced(prefill_, feed, a["reference"])
    size = sum(f.stat().st_size for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
               and not (f.suffix in (".onnx", ".onnx_data", ".data") and not f.name.startswith(file_name)))
    return {**res, "tf_argmax": tf, "peak_rss_bytes": rss, "load_s": load_s, "size_bytes": size,
            "versions": versions("optimum-onnx", "optimum", "onnxruntime", "transformers", "torch")}
