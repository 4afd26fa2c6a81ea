"""CUDA check: export a model (or take an artifact), run it with the CUDA provider, and
report parity with the CPU provider and decode speed on both.

    python scripts/gpu_check.py [--model gemma3-270m | --artifact DIR] [--precision fp16] [--out results.json]

fp16 / bf16 artifacts run their narrow graph on CUDA and model.cpu.onnx (the same
rounding, spelled out in fp32 arithmetic) on CPU, so CUDA vs CPU parity here is the
check that the CPU verify of those recipes speaks for the GPU.

Needs onnxruntime-gpu (CUDA 13 build for 1.31+) and an NVIDIA GPU; exits 2 with a
message when the CUDA provider is unavailable. CI has no GPU: the code this exercises
(DecoderSession's IO binding, generate) is shared with the CPU path the tests cover.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model spec to export (default: bundled Gemma 3 270M)")
    ap.add_argument("--artifact", type=Path, default=None, help="use an existing artifact instead of exporting")
    ap.add_argument("--precision", default="fp32", help="fp32, or a recipe applied after export (fp16, bf16, ...)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here too")
    args = ap.parse_args()

    from gemma_export.runtime.generate import SamplingConfig, load_generator
    from gemma_export.runtime.session import cuda_available

    if not cuda_available():
        print("CUDAExecutionProvider is not available (install onnxruntime-gpu with CUDA libraries)", file=sys.stderr)
        return 2

    artifact = args.artifact
    report: dict = {}
    if artifact is None:
        from gemma_export.exporter.pipeline import export_artifact

        artifact = Path(tempfile.mkdtemp()) / "artifact"
        t0 = time.perf_counter()
        res = export_artifact(args.model, artifact, verify=True)
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
        report["cpu_vs_pytorch_parity"] = res["parity"]
    if args.precision != "fp32":
        from gemma_export.errors import ParityError
        from gemma_export.exporter.pipeline import quantize_artifact

        narrow = artifact.parent / args.precision
        try:
            res = quantize_artifact(artifact, narrow, precision=args.precision, force=True, verify=True)
        except ParityError as e:  # written and reported; the GPU comparison still runs
            res = e.result
        report[f"{args.precision}_cpu_vs_pytorch_parity"] = res["parity"]
        artifact = narrow

    cpu = load_generator(artifact, provider="cpu")
    gpu = load_generator(artifact, provider="cuda")
    report["gpu_provider"] = gpu.session.session.get_providers()

    # Logits parity CUDA vs CPU on a ragged batch, prefill + 16 decode steps.
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    ids = [cpu.tokenizer.encode(p) for p in prompts]
    from gemma_export.runtime.generate import decode_one_token, prefill

    sc, sg = prefill(cpu.session, ids), prefill(gpu.session, ids)
    worst_rel, worst_abs, agree, total = 0.0, 0.0, 0, 0
    for _ in range(16):
        a, b = sc.logits.astype(np.float64), sg.logits.astype(np.float64)
        worst_rel = max(worst_rel, float(np.linalg.norm(a - b) / np.linalg.norm(a)))
        worst_abs = max(worst_abs, float(np.abs(a - b).max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        nxt = a.argmax(-1)
        sc, sg = decode_one_token(cpu.session, sc, nxt), decode_one_token(gpu.session, sg, nxt)
    report["cuda_vs_cpu"] = {"rel_l2": worst_rel, "max_abs": worst_abs, "top1_agreement": agree / total}

    cfg = SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    for name, gen in (("cpu", cpu), ("cuda", gpu)):
        gen.generate_result(["Warm up"], SamplingConfig(max_new_tokens=4, ignore_eos=True))
        r = gen.generate_result(["The capital of France is"], cfg)
        report[f"{name}_decode_tok_s"] = round(r.decode_tokens_per_second, 1)
        report[f"{name}_ttft_s"] = round(r.seconds_to_first_token, 4)
        report[f"{name}_text"] = r.texts[0][:200]
    report["same_greedy_text"] = report["cpu_text"] == report["cuda_text"]
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
