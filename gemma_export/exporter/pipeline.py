"""The export job end to end: load -> trace -> write the artifact -> verify -> rename.

`export_artifact` and `verify_dir` are what the CLI calls; each returns a plain dict
(the --json result) and raises GemmaExportError subclasses for anything the user can fix.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from gemma_export.errors import ArtifactError, CheckpointError, ParityError
from gemma_export.exporter import artifact as art
from gemma_export.exporter.export import DATA_FILE, MODEL_FILE, export_onnx, io_spec
from gemma_export.exporter import narrow
from gemma_export.exporter.optimize import SMALL, Optimized, fill_from, optimize_graph
from gemma_export.exporter.precision import Precision
from gemma_export.exporter.quantize import RECIPES, Recipe, product_inputs, quantize_graph
from gemma_export.exporter.verify import format_report, verify_artifact
from gemma_export.models.load import DEFAULT_MODEL, Checkpoint, load_model
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


KEPT_FP32_QUANTIZED = [
    "activations and the residual stream",
    "RMSNorm weights and arithmetic",
    "attention scores and softmax",
    "RoPE",
    "logits",
]


_FLAGS = {"symmetric": ("--asymmetric", "--symmetric"), "gptq": ("--rtn", "--gptq")}  # the CLI's spelling


def make_recipe(precision: Precision, block_size: int | None = None, symmetric: bool | None = None,
                accuracy_level: int | None = None, gptq: bool | None = None) -> Recipe | narrow.NarrowRecipe:
    changes = {k: v for k, v in dict(block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level,
                                     gptq=gptq).items()
               if v is not None}
    if precision in (Precision.FP16, Precision.BF16):
        if changes:
            flags = ", ".join(_FLAGS[k][bool(v)] if k in _FLAGS else "--" + k.replace("_", "-")
                              for k, v in changes.items())
            verb = "applies" if len(changes) == 1 else "apply"
            targets = "int8, int4 and gguf" if set(changes) == {"accuracy_level"} else "int8 and int4"
            raise CheckpointError(f"--precision {precision.value}: {flags} {verb} to {targets} only")
        return narrow.NarrowRecipe(precision.value)
    base = RECIPES[precision.value]
    if precision == Precision.GGUF and {"block_size", "symmetric", "gptq"} & changes.keys():
        raise CheckpointError("--precision gguf: block size, symmetry and rounding come from the GGUF file")
    if "block_size" in changes and (changes["block_size"] < 16 or changes["block_size"] & (changes["block_size"] - 1)):
        raise CheckpointError(f"--block-size {changes['block_size']}: must be a power of two >= 16")
    if "accuracy_level" in changes and changes["accuracy_level"] not in (0, 1, 2, 3, 4):
        raise CheckpointError(f"--accuracy-level {changes['accuracy_level']}: must be 0..4")
    return dataclasses.replace(base, **changes)


def graph_summary(proto, fusions: dict[str, int]) -> dict:
    """The manifest's `graph` entry: node count, op histogram, fusions applied, default-domain opset."""
    hist = Counter(n.op_type for n in proto.graph.node)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"nodes": len(proto.graph.node), "op_types": dict(hist.most_common()), "fusions": fusions,
            "opset": opset}


def _quantize_into(src_model: Path, dst: Path, recipe: Recipe | narrow.NarrowRecipe, gguf_path: Path | None,
                   progress: Progress, optimize: bool, calibration=None, cfg=None) -> tuple[dict, dict, dict]:
    """Read an fp32 graph, rewrite it with `recipe` (fusing first for fp16/bf16, after for
    the integer recipes), save into dst (model.onnx + data, and model.cpu.onnx for fp16/bf16).
    The integer recipes target ONNX Runtime's CPU provider and also get the attention
    fusion (GroupQueryAttention on a shared KV buffer, given `cfg`), with the
    contract-exact graph beside it (model.portable.onnx, same weights file); fp32, fp16
    and bf16 keep plain attention.
    `calibration()` gives the tokens fp16's range guard runs on. Returns (recipe summary,
    graph summary, manifest extras)."""
    import onnx

    try:
        proto = onnx.load(str(src_model))
    except onnx.checker.ValidationError as e:  # e.g. a weights file with a second hard link
        raise ArtifactError(f"{src_model.parent}: cannot read the fp32 weights ({str(e).strip().splitlines()[0]})") from e
    extra: dict[str, Any] = {}
    optimized = Optimized()
    if isinstance(recipe, narrow.NarrowRecipe):
        keep = {}
        if calibration is not None:
            with progress.stage("calibrating fp16 ranges"):
                keep = narrow.range_guard(src_model, proto, calibration())
        if optimize:
            optimized = optimize_graph(proto)
        summary = narrow.narrow_graph(proto, recipe, keep)
    else:
        moments = None
        if recipe.gptq:
            moments = _gptq_moments(src_model, proto, recipe, cfg, progress)
        summary = quantize_graph(proto, recipe, gguf_path, progress, moments)
        if optimize:
            optimized = optimize_graph(proto, cfg=cfg)
    onnx.save(proto, str(dst / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
              location=DATA_FILE, size_threshold=SMALL)
    if optimized.shared_cache:
        # The fused graph's cache is one buffer per tensor (a contract change): the manifest
        # says so, and the contract-exact graph from just before the attention fusion ships
        # beside it, reading the same weights file.
        onnx.save(fill_from(optimized.portable, proto), str(dst / PORTABLE_MODEL_FILE))
        # CUDA runs the contract-exact graph: the shared-buffer GroupQueryAttention with an
        # attention_bias is verified on ONNX Runtime's CPU provider only.
        extra.update(kv_cache="shared", io=io_spec(cfg, kv_cache="shared"), portable_model_file=PORTABLE_MODEL_FILE,
                     provider_model_files={"cuda": PORTABLE_MODEL_FILE})
    if isinstance(recipe, narrow.NarrowRecipe):
        # The same weights file, read by the graph that computes on CPU what CUDA computes.
        onnx.save(narrow.cpu_fallback_graph(proto), str(dst / narrow.CPU_MODEL_FILE))
        extra["provider_model_files"] = {"cpu": narrow.CPU_MODEL_FILE}
    return summary, graph_summary(proto, optimized.fusions), extra


def _gptq_moments(src_model: Path, proto, recipe: Recipe, cfg, progress: Progress):
    """Second moments of every product's input over text the fp32 graph samples, computed
    a layer at a time as quantize_graph asks for them."""
    from gemma_export.exporter.calibrate import InputMoments, sample_tokens

    length = min(recipe.gptq_length, cfg.max_position_embeddings)
    with progress.stage("sampling calibration text for GPTQ"):
        ids = sample_tokens(src_model, bos_id=cfg.bos_token_id, sequences=recipe.gptq_sequences, length=length,
                            seed=recipe.gptq_seed, progress=progress)
    return InputMoments(src_model, ids, product_inputs(proto))


def _kept_fp32(recipe, summary: dict) -> list[str]:
    if recipe is None:
        return ["everything"]
    if isinstance(recipe, narrow.NarrowRecipe):
        return narrow.KEPT_FP32 + [f"product {n} (calibrated |x| {v} near fp16's limit)"
                                   for n, v in summary["kept_fp32_products"].items()]
    return KEPT_FP32_QUANTIZED


def _calibration_ids(vocab_size: int, encode) -> "np.ndarray":
    """Tokens for fp16's range guard: the start of the shipped text when there is a
    tokenizer, seeded random ids otherwise."""
    import numpy as np

    from gemma_export.exporter.verify import CORPUS

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


def _finish_fp32(d: Path, optimize: bool) -> dict:
    """Fuse the fp32 graph in `d` when asked (structure only; the weights file is untouched);
    return its graph summary."""
    import onnx

    proto = onnx.load(str(d / MODEL_FILE), load_external_data=False)
    fusions = {}
    if optimize:
        fusions = optimize_graph(proto).fusions
        onnx.save(proto, str(d / MODEL_FILE))
    return graph_summary(proto, fusions)


def _contrib_ops(op_types: dict[str, int]) -> list[str]:
    """Ops outside standard ONNX that the graph needs from ONNX Runtime."""
    ort_only = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "MatMulNBits",
                "GatherBlockQuantized", "RotaryEmbedding", "GroupQueryAttention"}
    return sorted(set(op_types) & ort_only)


PORTABLE_MODEL_FILE = "model.portable.onnx"


def _write_side_files(d: Path, cfg, tok: bytes | None) -> None:
    if tok is not None:
        (d / art.TOKENIZER_FILE).write_bytes(tok)
    art.write_json(d / "config.json", cfg.to_hf_dict())
    art.write_json(
        d / "generation_config.json",
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "pad_token_id": cfg.pad_token_id},
    )


def _manifest(d: Path, *, cfg, precision: Precision, recipe: dict, kept: list[str], source: dict, max_length: int,
              graph: dict, has_tokenizer: bool, extra: dict | None = None) -> dict:
    manifest = {
        "format": "gemma-export",
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "data_file": DATA_FILE,
        "precision": precision.value,
        "recipe": recipe,
        "kept_fp32": kept,
        "source": source,
        "config": cfg.to_dict(),
        "layer_types": [t.value for t in cfg.layer_types],
        "max_length": max_length,
        "io": io_spec(cfg),
        "opset": graph["opset"],  # the graph's own default-domain opset (18 as traced)
        "graph": graph,
        # Non-standard ops this graph needs (ONNX Runtime contrib ops); [] = portable ONNX.
        "onnxruntime_ops": _contrib_ops(graph["op_types"]),
        "tokenizer": art.TOKENIZER_FILE if has_tokenizer else None,
        "versions": art.versions(),
        **(extra or {}),
        "parity": None,
        "files": art.file_table(d),
    }
    art.write_json(d / "manifest.json", manifest)
    return manifest


def export_artifact(
    model: str | None,
    out: Path,
    *,
    precision: Precision = Precision.FP32,
    max_length: int | None = None,
    force: bool = False,
    verify: bool = True,
    steps: int = 64,
    block_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    gptq: bool | None = None,
    optimize: bool = True,
    progress: Progress = NULL,
) -> dict[str, Any]:
    out = Path(out)
    precision = Precision(precision)
    recipe = make_recipe(precision, block_size, symmetric, accuracy_level, gptq) if precision != Precision.FP32 else None
    art.check_out_dir(out, force)  # fail before minutes of loading, not after
    t0 = time.perf_counter()
    with progress.stage("loading"):
        ckpt = load_model(model)
    cfg = ckpt.config
    if max_length is not None and not 1 <= max_length <= cfg.max_position_embeddings:
        raise CheckpointError(f"--max-length {max_length}: must be 1..{cfg.max_position_embeddings}")
    if precision == Precision.GGUF and ckpt.kind != "gguf":
        raise CheckpointError("--precision gguf: the model must be a GGUF file (or the bundled default)")

    tok = tokenizer_bytes(ckpt)
    with art.staging_dir(out, force) as tmp:
        if recipe is None:
            with progress.stage("tracing to ONNX"):
                export_onnx(ckpt.model, tmp)
            with progress.stage("fusing for ONNX Runtime" if optimize else "summarising graph"):
                graph = _finish_fp32(tmp, optimize)
        else:
            fp32 = tmp / ".fp32"
            fp32.mkdir()
            with progress.stage("tracing to ONNX"):
                export_onnx(ckpt.model, fp32)
            with progress.stage(f"quantizing ({precision.value})"):
                summary, graph, extra = _quantize_into(
                    fp32 / MODEL_FILE, tmp, recipe, ckpt.path if ckpt.kind == "gguf" else None, progress, optimize,
                    lambda: _calibration_ids(cfg.vocab_size, _encoder(tok)), cfg)
            shutil.rmtree(fp32)
        with progress.stage("writing artifact"):
            _write_side_files(tmp, cfg, tok)
            manifest = _manifest(
                tmp, cfg=cfg, precision=precision,
                recipe=recipe.to_dict() if recipe else {"name": "fp32"},
                kept=_kept_fp32(recipe, summary if recipe else {}),
                source=_source(model, ckpt), max_length=max_length or cfg.max_position_embeddings,
                graph=graph, has_tokenizer=tok is not None,
                extra={"quantized": summary, **extra} if recipe else None,
            )
        report = None
        if verify:
            with progress.stage("verifying parity"):
                report = _verify(tmp, ckpt, steps, progress)
    return _result(out, ckpt.description, precision, t0, manifest, report)


def _source(spec: str | None, ckpt: Checkpoint) -> dict:
    return {
        "spec": spec,
        "kind": ckpt.kind,
        "path": str(ckpt.path.resolve()) if ckpt.path else None,
        "description": ckpt.description,
    }


def _result(out: Path, model: str, precision: Precision, t0: float, manifest: dict, report) -> dict:
    res = {
        "out": str(out),
        "model": model,
        "precision": precision.value,
        "seconds": round(time.perf_counter() - t0, 1),
        "size_bytes": sum(f["size"] for f in manifest["files"].values()),
        "op_types": manifest["graph"]["op_types"],
        "parity": report.to_dict() if report else None,
        "parity_table": format_report(report) if report else None,
    }
    if report is not None and not report.passed:
        raise ParityError(f"{out}: parity FAILED for {precision.value} (see {out / art.PARITY_FILE})", res)
    return res


def quantize_artifact(
    src: Path,
    out: Path,
    *,
    precision: Precision,
    force: bool = False,
    verify: bool = True,
    steps: int = 64,
    block_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    gptq: bool | None = None,
    model: str | None = None,
    optimize: bool = True,
    progress: Progress = NULL,
) -> dict[str, Any]:
    """`gemma-export quantize SRC --precision P --out DIR`: a recipe applied to an fp32 artifact."""
    src, out = Path(src), Path(out)
    precision = Precision(precision)
    if precision == Precision.FP32:
        raise CheckpointError("--precision fp32: quantize makes fp16, bf16, int8, int4 or gguf artifacts")
    recipe = make_recipe(precision, block_size, symmetric, accuracy_level, gptq)
    manifest = read_manifest(src)
    if manifest["precision"] != Precision.FP32.value:
        raise ArtifactError(f"{src}: is a {manifest['precision']} artifact; quantize starts from an fp32 one")
    check_files(src, manifest, hashes=False)
    art.check_out_dir(out, force)
    t0 = time.perf_counter()
    source = manifest["source"]
    gguf_path = Path(source["path"]) if source["kind"] == "gguf" and source["path"] else None
    if precision == Precision.GGUF and (gguf_path is None or not gguf_path.is_file()):
        raise ArtifactError(f"{src}: --precision gguf needs the source GGUF ({source['path'] or 'not a GGUF export'})")
    ckpt = None
    if verify:
        with progress.stage("loading source model"):
            ckpt = _load_source(src, manifest, model)
    from gemma_export.models.config import GemmaConfig

    cfg = GemmaConfig.from_dict(manifest["config"])
    with art.staging_dir(out, force) as tmp:
        tok = (src / art.TOKENIZER_FILE).read_bytes() if manifest.get("tokenizer") else None
        with progress.stage(f"quantizing ({precision.value})"):
            summary, graph, extra = _quantize_into(src / manifest["model_file"], tmp, recipe, gguf_path, progress,
                                                   optimize, lambda: _calibration_ids(cfg.vocab_size, _encoder(tok)),
                                                   cfg)
        _write_side_files(tmp, cfg, tok)
        new = _manifest(
            tmp, cfg=cfg, precision=precision, recipe=recipe.to_dict(), kept=_kept_fp32(recipe, summary),
            source=source, max_length=manifest["max_length"], graph=graph, has_tokenizer=tok is not None,
            extra={"quantized": summary, "derived_from": str(src.resolve()), **extra},
        )
        report = None
        if verify:
            with progress.stage("verifying parity"):
                report = _verify(tmp, ckpt, steps, progress)
    return _result(out, ckpt.description if ckpt else source["description"], precision, t0, new, report)


def _load_source(d: Path, manifest: dict, model: str | None) -> Checkpoint:
    src = manifest["source"]
    spec = model if model is not None else src["spec"]
    if model is None and src["kind"] in ("hf", "gguf") and spec not in (None, DEFAULT_MODEL) and not Path(spec).exists():
        raise ArtifactError(f"{d}: source model {src['spec']} not found here (pass --model to point at it)")
    ckpt = load_model(spec)
    if ckpt.config.to_dict() | {"name": ""} != manifest["config"] | {"name": ""}:
        raise ArtifactError(f"{d}: the source model's config differs from the artifact's ({ckpt.description})")
    return ckpt


def _verify(d: Path, ckpt: Checkpoint, steps: int, progress: Progress):
    """Run parity for the artifact in `d` against `ckpt`; record it in parity.json and
    the manifest's summary."""
    sess = DecoderSession(d, provider="cpu")
    encode = corpus_encode = None
    if (d / art.TOKENIZER_FILE).is_file():
        from gemma_export.runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_file(d / art.TOKENIZER_FILE)
        corpus_encode = tok.encode
        if ckpt.kind != "preset":  # random weights: seeded ids make better-spread prompts
            encode = tok.encode
    report = verify_artifact(sess, ckpt.model, encode=encode, corpus_encode=corpus_encode, steps=steps,
                             progress=progress)
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
    with progress.stage("loading source model"):
        ckpt = _load_source(d, manifest, model)
    with progress.stage("verifying parity"):
        report = _verify(d, ckpt, steps, progress)
    res = {"artifact": str(d), "model": ckpt.description, "parity": report.to_dict(), "parity_table": format_report(report)}
    if not report.passed:
        raise ParityError(f"{d}: parity FAILED for {report.precision}", res)
    return res
