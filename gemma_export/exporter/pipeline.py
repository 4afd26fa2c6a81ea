"""The artifact job end to end: a source and a recipe -> the artifact, verified, renamed into place.

    run_export(model, out, precision)     load -> trace -> recipe -> files -> verify  -> Artifact
    run_quantize(src, out, precision)     an fp32 artifact's graph -> recipe -> files -> verify  -> Artifact
    run_verify(dir)                       checksums, then parity again  -> ParityReport

export and quantize differ only in where the fp32 graph comes from (`_build` does the
rest for both). The typed results are what the Python API (api.py) returns and the CLI
prints; each raises GemmaExportError subclasses for anything the user can fix, and
ParityError on a parity miss, after the artifact is in place. export_artifact /
quantize_artifact / verify_dir return the same runs as the CLI's --json object.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from gemma_export.contract import (
    CORPUS, DATA_FILE, GENERATION_CONFIG_FILE, HF_CONFIG_FILE, HF_SPECIAL_TOKENS_FILE, HF_TOKENIZER_CONFIG_FILE,
    HF_TOKENIZER_FILE, MODEL_FILE, PARITY_FILE, TOKENIZER_FILE, KVLayout, Precision, io_spec,
)
from gemma_export.api import Artifact, verify_result
from gemma_export.errors import ArtifactError, CheckpointError, ParityError, UsageError
from gemma_export.exporter import artifact as art
from gemma_export.exporter.export import export_onnx, export_onnx_streamed
from gemma_export.exporter.recipes import ArtifactRecipe, Job, Made, RecipeOptions, contrib_ops, make_recipe
from gemma_export.exporter.verify import verify_artifact
from gemma_export.models.load import DEFAULT_MODEL, Checkpoint, load_model
from gemma_export.parity import ParityReport
from gemma_export.progress import NULL, Progress
from gemma_export.runtime.manifest import Manifest, Source, write_json
from gemma_export.runtime.session import DecoderSession


def export_graph(ckpt: Checkpoint, d: Path) -> None:
    """Trace a checkpoint into d/MODEL_FILE (+ DATA_FILE): presets without the model in memory."""
    if ckpt.weights is not None:
        export_onnx_streamed(ckpt.config, ckpt.weights, d)
    else:
        export_onnx(ckpt.model, d)


def tokenizer_bytes(ckpt: Checkpoint) -> bytes | None:
    """tokenizer.model for the artifact: copied from an HF directory, built from a GGUF
    vocabulary, or a small byte-level one for random-weight presets (so tiny artifacts
    run end to end through text)."""
    from gemma_export.exporter import tokenizer_source as ts

    if ckpt.kind == "hf":
        return ts.tokenizer_from_hf_dir(ckpt.path)
    if ckpt.kind == "gguf":
        return ts.tokenizer_from_gguf(ckpt.path)
    return ts.preset_tokenizer(ckpt.config.vocab_size, ckpt.config.family)


def _calibration_ids(vocab_size: int, encode):
    """Tokens for fp16's range guard: the start of the shipped text when there is a
    tokenizer, seeded random ids otherwise: int64 [1, T]."""
    import numpy as np

    if encode is not None:
        ids = encode(CORPUS.read_text(encoding="utf-8")[:4000], add_bos=True)[:512]
    else:
        ids = np.random.default_rng(7).integers(4, vocab_size, 128).tolist()
    return np.asarray([ids], dtype=np.int64)


def _encoder(tok: bytes | None):
    if tok is None:
        return None
    from gemma_export.runtime.tokenizer import Tokenizer

    return Tokenizer.from_bytes(tok).encode


def _write_side_files(d: Path, cfg, tok: bytes | None, *, precision: Precision, made: Made,
                      max_length: int) -> tuple[dict[str, dict[str, str]], str]:
    """tokenizer.model and the files other clients read (Hugging Face config and tokenizer
    files, genai_config.json, the transformers.js folder, which the weights move into);
    returns the manifest's `clients` and `data_file`."""
    from gemma_export.exporter import clients, hf_tokenizer

    if tok is not None:
        (d / TOKENIZER_FILE).write_bytes(tok)
        write_json(d / HF_TOKENIZER_FILE, hf_tokenizer.tokenizer_json(tok), compact=True)
        write_json(d / HF_TOKENIZER_CONFIG_FILE, hf_tokenizer.tokenizer_config(tok, max_length, cfg.family))
        write_json(d / HF_SPECIAL_TOKENS_FILE, hf_tokenizer.special_tokens_map(tok, cfg.family))
    hf_config = cfg.to_hf_dict()
    tfjs = clients.tfjs_config(precision)
    if tfjs is not None:
        hf_config["transformers.js_config"] = tfjs
    write_json(d / HF_CONFIG_FILE, hf_config)
    write_json(
        d / GENERATION_CONFIG_FILE,
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id},
    )
    fields = made.fields
    return clients.write_client_files(
        d, cfg, precision=precision, kv_cache=fields.get("kv_cache") or KVLayout.CONCAT, model_file=MODEL_FILE,
        portable_model_file=fields.get("portable_model_file"),
        cpu_model_file=(fields.get("provider_model_files") or {}).get("cpu"), data_file=DATA_FILE,
        max_length=max_length)


def _manifest(d: Path, *, cfg, recipe: ArtifactRecipe, made: Made, source: Source, max_length: int,
              has_tokenizer: bool, clients: dict[str, dict[str, str]], data_file: str,
              derived_from: str | None = None) -> Manifest:
    """The manifest of the artifact being built in `d`, written there (parity still None)."""
    manifest = Manifest(
        model_file=MODEL_FILE,
        data_file=data_file,
        precision=recipe.precision,
        recipe=recipe.to_dict(),
        kept_fp32=made.kept_fp32,
        source=source,
        config=cfg.to_dict(),
        layer_types=[t.value for t in cfg.layer_types],
        max_length=max_length,
        io=io_spec(cfg),
        opset=made.graph["opset"],  # the graph's own default-domain opset (18 as traced)
        graph=made.graph,
        onnxruntime_ops=contrib_ops(made.graph["op_types"]),
        tokenizer=TOKENIZER_FILE if has_tokenizer else None,
        versions=art.versions(),
        quantized=made.summary,
        derived_from=derived_from,
        clients=clients,
        files=art.file_table(d),
    )
    manifest = dataclasses.replace(manifest, **made.fields)
    manifest.write(d)
    return manifest


def _build(out: Path, *, force: bool, recipe: ArtifactRecipe, cfg, tok: bytes | None, source: Source,
           max_length: int, fp32_into: Callable[[Path], Path], gguf_path: Path | None, optimize: bool,
           verify_against: Checkpoint | None, steps: int, progress: Progress,
           derived_from: str | None = None) -> tuple[Manifest, Any]:
    """Stage the artifact: `fp32_into(dir)` puts the fp32 graph somewhere (tracing it into
    `dir`, or naming an existing artifact's graph), the recipe writes the graphs, then the
    side files and manifest, then verify; renamed onto `out` only when all of it worked."""
    with art.staging_dir(out, force) as tmp:
        scratch = tmp / ".fp32"
        fp32_model = fp32_into(tmp if recipe.precision == Precision.FP32 else scratch)
        if recipe.precision != Precision.FP32:
            label = f"quantizing ({recipe.precision.value})"
        else:
            label = "fusing for ONNX Runtime" if optimize else "summarising graph"
        with progress.stage(label):
            made = recipe.apply(Job(fp32_model=fp32_model, dst=tmp, cfg=cfg, optimize=optimize, progress=progress,
                                    gguf_path=gguf_path,
                                    calibration=lambda: _calibration_ids(cfg.vocab_size, _encoder(tok))))
        shutil.rmtree(scratch, ignore_errors=True)
        with progress.stage("writing artifact"):
            clients, data_file = _write_side_files(tmp, cfg, tok, precision=recipe.precision, made=made,
                                                   max_length=max_length)
            manifest = _manifest(tmp, cfg=cfg, recipe=recipe, made=made, source=source, max_length=max_length,
                                 has_tokenizer=tok is not None, clients=clients, data_file=data_file,
                                 derived_from=derived_from)
        report = None
        if verify_against is not None:
            with progress.stage("verifying parity"):
                report = _verify(tmp, manifest, verify_against, steps, progress)
    return manifest, report


def run_export(
    model: str | None,
    out: Path,
    *,
    precision: Precision | str = Precision.FP32,
    options: RecipeOptions | None = None,
    max_length: int | None = None,
    force: bool = False,
    verify: bool = True,
    steps: int = 64,
    optimize: bool = True,
    progress: Progress = NULL,
) -> Artifact:
    """`gemma-export export MODEL --out DIR`: trace a checkpoint, apply the precision's recipe."""
    out = Path(out)
    recipe = make_recipe(precision, options)
    art.check_out_dir(out, force)  # fail before minutes of loading, not after
    t0 = time.perf_counter()
    with progress.stage("loading"):
        ckpt = load_model(model)
    cfg = ckpt.config
    if max_length is not None and not 1 <= max_length <= cfg.max_position_embeddings:
        raise CheckpointError(f"--max-length {max_length}: must be 1..{cfg.max_position_embeddings}")
    if recipe.precision == Precision.GGUF and ckpt.kind != "gguf":
        raise CheckpointError("--precision gguf: the model must be a GGUF file (or the bundled default)")

    def trace(d: Path) -> Path:
        d.mkdir(exist_ok=True)
        with progress.stage("tracing to ONNX"):
            export_graph(ckpt, d)
        return d / MODEL_FILE

    manifest, report = _build(
        out, force=force, recipe=recipe, cfg=cfg, tok=tokenizer_bytes(ckpt), source=_source(model, ckpt),
        max_length=max_length or cfg.max_position_embeddings, fp32_into=trace,
        gguf_path=ckpt.path if ckpt.kind == "gguf" else None, optimize=optimize,
        verify_against=ckpt if verify else None, steps=steps, progress=progress)
    return _finish(out, t0, manifest, report)


def _source(spec: str | None, ckpt: Checkpoint) -> Source:
    return Source(spec=spec, kind=ckpt.kind, path=str(ckpt.path.resolve()) if ckpt.path else None,
                  description=ckpt.description)


def _finish(out: Path, t0: float, manifest: Manifest, report: ParityReport | None) -> Artifact:
    """The artifact now in place; ParityError (carrying it) if its parity missed."""
    artifact = Artifact(out, manifest, report)
    if report is not None and not report.passed:
        raise ParityError(f"{out}: parity FAILED for {manifest.precision.value} (see {out / PARITY_FILE})",
                          artifact.result(time.perf_counter() - t0), report=report, artifact=artifact)
    return artifact


def run_quantize(
    src: Path,
    out: Path,
    *,
    precision: Precision | str,
    options: RecipeOptions | None = None,
    force: bool = False,
    verify: bool = True,
    steps: int = 64,
    model: str | None = None,
    optimize: bool = True,
    progress: Progress = NULL,
) -> Artifact:
    """`gemma-export quantize SRC --precision P --out DIR`: a recipe applied to an fp32 artifact."""
    src, out = Path(src), Path(out)
    if Precision(precision) == Precision.FP32:
        raise UsageError("--precision fp32: quantize makes fp16, bf16, int8, int4 or gguf artifacts")
    recipe = make_recipe(precision, options)
    manifest = Manifest.read(src)
    if manifest.precision != Precision.FP32:
        raise ArtifactError(f"{src}: is a {manifest.precision.value} artifact; quantize starts from an fp32 one")
    manifest.check_files(src, hashes=False)
    art.check_out_dir(out, force)
    t0 = time.perf_counter()
    source = manifest.source
    gguf_path = Path(source.path) if source.kind == "gguf" and source.path else None
    if recipe.precision == Precision.GGUF and (gguf_path is None or not gguf_path.is_file()):
        raise ArtifactError(f"{src}: --precision gguf needs the source GGUF ({source.path or 'not a GGUF export'})")
    ckpt = None
    if verify:
        with progress.stage("loading source model"):
            ckpt = _load_source(src, manifest, model)
    from gemma_export.models.config import GemmaConfig

    cfg = GemmaConfig.from_dict(manifest.config)
    new, report = _build(
        out, force=force, recipe=recipe, cfg=cfg,
        tok=(src / manifest.tokenizer).read_bytes() if manifest.tokenizer else None, source=source,
        max_length=manifest.max_length, fp32_into=lambda _d: src / manifest.model_file, gguf_path=gguf_path,
        optimize=optimize, verify_against=ckpt, steps=steps, progress=progress, derived_from=str(src.resolve()))
    return _finish(out, t0, new, report)


def _load_source(d: Path, manifest: Manifest, model: str | None) -> Checkpoint:
    src = manifest.source
    spec = model if model is not None else src.spec
    if model is None and src.kind in ("hf", "gguf") and spec not in (None, DEFAULT_MODEL) and not Path(spec).exists():
        raise ArtifactError(f"{d}: source model {src.spec} not found here (pass --model to point at it)")
    ckpt = load_model(spec)
    if ckpt.config.to_dict() | {"name": ""} != manifest.config | {"name": ""}:
        raise ArtifactError(f"{d}: the source model's config differs from the artifact's ({ckpt.description})")
    return ckpt


def _verify(d: Path, manifest: Manifest, ckpt: Checkpoint, steps: int, progress: Progress):
    """Run parity for the artifact in `d` against `ckpt`; record it in parity.json and
    the manifest's summary."""
    sess = DecoderSession(d, provider="cpu")
    encode = corpus_encode = None
    if manifest.tokenizer:
        from gemma_export.runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_file(d / manifest.tokenizer)
        corpus_encode = tok.encode
        if ckpt.kind != "preset":  # random weights: seeded ids make better-spread prompts
            encode = tok.encode
    report = verify_artifact(sess, ckpt.model, encode=encode, corpus_encode=corpus_encode, steps=steps,
                             progress=progress)
    report.model = ckpt.description
    write_json(d / PARITY_FILE, report.to_dict())
    manifest.parity = {
        "passed": report.passed,
        "metrics": {m.name: {"measured": m.measured, "threshold": m.threshold, "op": m.op} for m in report.metrics},
        "heldout": report.heldout,
    }
    manifest.write(d)
    return report


def run_verify(d: Path, model: str | None = None, *, steps: int = 64, progress: Progress = NULL) -> ParityReport:
    """`gemma-export verify DIR`: checksums, then parity against the source model (the one
    the manifest names, or `model` when given)."""
    d = Path(d)
    manifest = Manifest.read(d)
    with progress.stage("checking files"):
        manifest.check_files(d, hashes=True)
    with progress.stage("loading source model"):
        ckpt = _load_source(d, manifest, model)
    with progress.stage("verifying parity"):
        report = _verify(d, manifest, ckpt, steps, progress)
    if not report.passed:
        raise ParityError(f"{d}: parity FAILED for {report.precision}", verify_result(d, report), report=report,
                          artifact=Artifact(d, manifest, report))
    return report


# -- the same runs as the CLI's --json object (scripts and tests read these) ----------------------


def export_artifact(model: str | None, out: Path, **kw: Any) -> dict[str, Any]:
    """run_export's artifact as `gemma-export export --json` prints it."""
    t0 = time.perf_counter()
    return run_export(model, out, **kw).result(time.perf_counter() - t0)


def quantize_artifact(src: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """run_quantize's artifact as `gemma-export quantize --json` prints it."""
    t0 = time.perf_counter()
    return run_quantize(src, out, **kw).result(time.perf_counter() - t0)


def verify_dir(d: Path, model: str | None = None, **kw: Any) -> dict[str, Any]:
    """run_verify's report as `gemma-export verify --json` prints it."""
    return verify_result(d, run_verify(d, model, **kw))
