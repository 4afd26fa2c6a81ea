"""The export job end to end: load -> trace -> write the artifact -> verify -> rename.

`export_artifact` and `verify_dir` are what the CLI calls; each returns a plain dict
(the --json result) and raises GemmaExportError subclasses for anything the user can fix.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from gemma_export.errors import ArtifactError, CheckpointError, ParityError
from gemma_export.exporter import artifact as art
from gemma_export.exporter.export import DATA_FILE, MODEL_FILE, OPSET, export_onnx, io_spec
from gemma_export.exporter.precision import Precision
from gemma_export.exporter.verify import format_report, verify_artifact
from gemma_export.models.load import Checkpoint, load_model
from gemma_export.progress import NULL, Progress
from gemma_export.runtime.manifest import FORMAT_VERSION, check_files, read_manifest
from gemma_export.runtime.session import DecoderSession


def tokenizer_bytes(ckpt: Checkpoint) -> bytes | None:
    """tokenizer.model for the artifact: copied from an HF directory, built from a GGUF
    vocabulary, or a small byte-level one for random-weight presets (so tiny artifacts
    run end to end through text)."""
    from gemma_export.exporter import tokenizer_source as ts

    if ckpt.kind == "hf":
        return ts.tokenizer_from_hf_dir(ckpt.path)
    if ckpt.kind == "gguf":
        return ts.tokenizer_from_gguf(ckpt.path)
    return ts.preset_tokenizer(ckpt.config.vocab_size)


def export_artifact(
    model: str | None,
    out: Path,
    *,
    precision: Precision = Precision.FP32,
    max_length: int | None = None,
    force: bool = False,
    verify: bool = True,
    steps: int = 64,
    progress: Progress = NULL,
) -> dict[str, Any]:
    out = Path(out)
    precision = Precision(precision)
    if precision != Precision.FP32:
        raise CheckpointError(f"--precision {precision.value}: not available yet (fp32 only in this version)")
    art.check_out_dir(out, force)  # fail before minutes of loading, not after
    t0 = time.perf_counter()
    with progress.stage("loading"):
        ckpt = load_model(model)
    cfg = ckpt.config
    if max_length is not None and not 1 <= max_length <= cfg.max_position_embeddings:
        raise CheckpointError(f"--max-length {max_length}: must be 1..{cfg.max_position_embeddings}")

    with art.staging_dir(out, force) as tmp:
        with progress.stage("tracing to ONNX"):
            result = export_onnx(ckpt.model, tmp)
        with progress.stage("writing artifact"):
            tok = tokenizer_bytes(ckpt)
            if tok is not None:
                (tmp / art.TOKENIZER_FILE).write_bytes(tok)
            art.write_json(tmp / "config.json", cfg.to_hf_dict())
            art.write_json(
                tmp / "generation_config.json",
                {
                    "bos_token_id": cfg.bos_token_id,
                    "eos_token_id": list(cfg.eos_token_ids),
                    "pad_token_id": cfg.pad_token_id,
                },
            )
            manifest = {
                "format": "gemma-export",
                "format_version": FORMAT_VERSION,
                "model_file": MODEL_FILE,
                "data_file": DATA_FILE,
                "precision": precision.value,
                "recipe": {"name": precision.value},
                "kept_fp32": ["everything"] if precision == Precision.FP32 else [],
                "source": {
                    "spec": model,
                    "kind": ckpt.kind,
                    "path": str(ckpt.path.resolve()) if ckpt.path else None,
                    "description": ckpt.description,
                },
                "config": cfg.to_dict(),
                "layer_types": [t.value for t in cfg.layer_types],
                "max_length": max_length or cfg.max_position_embeddings,
                "io": io_spec(cfg),
                "opset": OPSET,
                "graph": {"nodes": result.num_nodes, "op_types": result.op_histogram},
                "tokenizer": art.TOKENIZER_FILE if tok is not None else None,
                "versions": art.versions(),
                "parity": None,
                "files": art.file_table(tmp),
            }
            art.write_json(tmp / "manifest.json", manifest)
        report = None
        if verify:
            with progress.stage("verifying parity"):
                report = _verify(tmp, ckpt, steps, progress)
    res = {
        "out": str(out),
        "model": ckpt.description,
        "precision": precision.value,
        "seconds": round(time.perf_counter() - t0, 1),
        "size_bytes": sum(f["size"] for f in manifest["files"].values()),
        "op_types": result.op_histogram,
        "parity": report.to_dict() if report else None,
        "parity_table": format_report(report) if report else None,
    }
    if report is not None and not report.passed:
        raise ParityError(f"{out}: parity FAILED for {precision.value} (see {out / art.PARITY_FILE})", res)
    return res


def _verify(d: Path, ckpt: Checkpoint, steps: int, progress: Progress):
    """Run parity for the artifact in `d` against `ckpt`; record it in parity.json and
    the manifest's summary."""
    sess = DecoderSession(d, provider="cpu")
    encode = None
    if (d / art.TOKENIZER_FILE).is_file() and ckpt.kind != "preset":
        from gemma_export.runtime.tokenizer import Tokenizer

        encode = Tokenizer.from_file(d / art.TOKENIZER_FILE).encode
    report = verify_artifact(sess, ckpt.model, encode=encode, steps=steps, progress=progress)
    art.write_json(d / art.PARITY_FILE, report.to_dict())
    manifest = read_manifest(d)
    manifest["parity"] = {
        "passed": report.passed,
        "metrics": {m.name: {"measured": m.measured, "threshold": m.threshold, "op": m.op} for m in report.metrics},
    }
    art.write_json(d / "manifest.json", manifest)
    return report


def verify_dir(d: Path, model: str | None = None, *, steps: int = 64, progress: Progress = NULL) -> dict[str, Any]:
    """`gemma-export verify DIR`: checksums, then parity against the source model (the one
    the manifest names, or `model` when given)."""
    d = Path(d)
    manifest = read_manifest(d)
    with progress.stage("checking files"):
        check_files(d, manifest, hashes=True)
    spec = model if model is not None else manifest["source"]["spec"]
    src = manifest["source"]
    if model is None and src["kind"] != "preset" and src["spec"] is not None and not Path(src["spec"]).exists():
        raise ArtifactError(f"{d}: source model {src['spec']} not found here (pass --model to point at it)")
    with progress.stage("loading source model"):
        ckpt = load_model(spec)
    if ckpt.config.to_dict() | {"name": ""} != manifest["config"] | {"name": ""}:
        raise ArtifactError(f"{d}: the source model's config differs from the artifact's ({ckpt.description})")
    with progress.stage("verifying parity"):
        report = _verify(d, ckpt, steps, progress)
    res = {"artifact": str(d), "model": ckpt.description, "parity": report.to_dict(), "parity_table": format_report(report)}
    if not report.passed:
        raise ParityError(f"{d}: parity FAILED for {report.precision}", res)
    return res
