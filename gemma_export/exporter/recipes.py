"""Recipes as units: how an fp32 graph becomes the graphs of an artifact of one precision.

Every precision is one `ArtifactRecipe`:

    precision          the Precision it makes (the manifest's `precision`)
    to_dict()          its parameters (the manifest's `recipe`)
    apply(job) -> Made rewrite the fp32 graph into job.dst: the graphs it writes there (on the
                       one weights file), its summary, what it kept in fp32, and the manifest
                       fields it adds (kv_cache, io, portable / per-provider graphs)

`make_recipe(precision, RecipeOptions)` builds one from what the user asked; an option
that does not apply to the precision is a UsageError (exit 2). The pipeline
(pipeline.py) runs every recipe the same way, for `export` and `quantize` alike.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from gemma_export.contract import (
    CPU_MODEL_FILE, MODEL_FILE, PORTABLE_MODEL_FILE, KVLayout, Precision, io_spec,
)
from gemma_export.errors import ExportError, UsageError
from gemma_export.exporter import narrow
from gemma_export.exporter.optimize import Optimized, fill_from, optimize_graph
from gemma_export.exporter.quantize import (
    RECIPES, Recipe, product_inputs, product_table, quantize_graph, rounded_inputs,
)
from gemma_export.progress import Progress

# What the integer recipes leave in fp32 (the manifest's kept_fp32), in words.
KEPT_FP32_QUANTIZED = [
    "activations and the residual stream",
    "RMSNorm weights and arithmetic",
    "attention scores and softmax",
    "RoPE",
    "logits",
]
# Ops outside standard ONNX that a graph may need from ONNX Runtime.
ORT_CONTRIB_OPS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "MatMulNBits",
                   "GatherBlockQuantized", "RotaryEmbedding", "GroupQueryAttention"}


@dataclass(frozen=True)
class RecipeOptions:
    """What a user may set on a recipe; None leaves the recipe's default."""

    block_size: int | None = None  # int8 / int4: quantization block size
    symmetric: bool | None = None  # int8 / int4: no zero points
    accuracy_level: int | None = None  # int8 / int4 / gguf: MatMulNBits compute (0 fp32 .. 4 int8)
    gptq: bool | None = None  # int8 / int4: GPTQ rounding instead of round to nearest

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Job:
    """One recipe run: the fp32 graph it starts from and where it writes."""

    fp32_model: Path  # the traced (or exported) fp32 graph, with its weights file beside it
    dst: Path  # the staging directory: the recipe writes MODEL_FILE (+ siblings) and DATA_FILE here
    cfg: Any  # models.config.GemmaConfig
    optimize: bool  # fuse for ONNX Runtime (False: plain-op graph)
    progress: Progress
    gguf_path: Path | None = None  # the source GGUF, for the gguf recipe
    calibration: Callable[[], Any] | None = None  # tokens [1, T] for fp16's range guard


@dataclass
class Made:
    """What a recipe produced, for the manifest."""

    graph: dict[str, Any]  # node count, op histogram, fusions, opset of MODEL_FILE
    kept_fp32: list[str]
    summary: dict[str, Any] | None = None  # the manifest's `quantized`
    fields: dict[str, Any] = field(default_factory=dict)  # further manifest fields (kv_cache, io, ...)


class ArtifactRecipe(Protocol):
    precision: Precision

    def to_dict(self) -> dict[str, Any]: ...

    def apply(self, job: Job) -> Made: ...


def graph_summary(proto, fusions: dict[str, int]) -> dict:
    """The manifest's `graph` entry: node count, op histogram, fusions applied, default-domain opset."""
    hist = Counter(n.op_type for n in proto.graph.node)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"nodes": len(proto.graph.node), "op_types": dict(hist.most_common()), "fusions": fusions,
            "opset": opset}


def contrib_ops(op_types: dict[str, int]) -> list[str]:
    """Ops outside standard ONNX that the graph needs from ONNX Runtime (the manifest's onnxruntime_ops)."""
    return sorted(set(op_types) & ORT_CONTRIB_OPS)


# -- the recipes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fp32Recipe:
    """The traced graph itself, fused in place (structure only; the weights file is untouched)."""

    precision: Precision = Precision.FP32

    def to_dict(self) -> dict[str, Any]:
        return {"name": "fp32"}

    def apply(self, job: Job) -> Made:
        import onnx

        assert job.fp32_model == job.dst / MODEL_FILE, "fp32 is traced straight into the artifact"
        proto = onnx.load(str(job.fp32_model), load_external_data=False)
        fusions = {}
        if job.optimize:
            fusions = optimize_graph(proto).fusions
            onnx.save(proto, str(job.fp32_model))
        return Made(graph=graph_summary(proto, fusions), kept_fp32=["everything"])


@dataclass(frozen=True)
class _WithParams:
    """A recipe whose parameters are their own dataclass: its `name` is the precision, its
    to_dict() the manifest's `recipe`."""

    params: Any

    @property
    def precision(self) -> Precision:
        return Precision(self.params.name)

    def to_dict(self) -> dict[str, Any]:
        return self.params.to_dict()


@dataclass(frozen=True)
class NarrowArtifactRecipe(_WithParams):
    """fp16 / bf16 for CUDA: products narrow, the rest fp32 (exporter/narrow.py), fused
    first; a CPU graph beside it that rounds as a narrow GEMM does, on the same weights."""

    params: narrow.NarrowRecipe

    def apply(self, job: Job) -> Made:
        import onnx

        proto = _load(job.fp32_model)
        keep = {}
        if job.calibration is not None:
            with job.progress.stage("calibrating fp16 ranges"):
                keep = narrow.range_guard(job.fp32_model, proto, job.calibration())
        fusions = optimize_graph(proto).fusions if job.optimize else {}
        summary = narrow.narrow_graph(proto, self.params, keep, scratch=_scratch(job))
        _save(proto, job.dst)
        onnx.save(narrow.cpu_fallback_graph(proto), str(job.dst / CPU_MODEL_FILE))
        kept = narrow.KEPT_FP32 + [f"product {n} (calibrated |x| {v} near fp16's limit)"
                                   for n, v in summary["kept_fp32_products"].items()]
        return Made(graph=graph_summary(proto, fusions), kept_fp32=kept, summary=summary,
                    fields={"provider_model_files": {"cpu": CPU_MODEL_FILE}})


@dataclass(frozen=True)
class IntegerRecipe(_WithParams):
    """int8 / int4 / gguf for CPUs: weight-only blocks through MatMulNBits and
    GatherBlockQuantized (exporter/quantize.py), fused after; where attention fuses onto a
    shared KV buffer, the contract-exact graph ships beside it on the same weights."""

    params: Recipe

    def _splits_outliers(self) -> bool:
        return self.params.outlier_ratio > 0 and self.params.accuracy_level == 4  # else nothing is rounded

    def apply(self, job: Job) -> Made:
        import onnx

        proto = _load(job.fp32_model)
        moments = _gptq_moments(job, proto, self.params) if self.params.gptq else None
        exact_head = self.params.exact_top_k > 0 and self.params.accuracy_level == 4
        # With the head's top logits recomputed exactly, its input's outlier split would
        # only refine the logits that decide nothing.
        inputs = list(product_inputs(proto)) if exact_head else rounded_inputs(proto)
        outliers = _outlier_channels(job, proto, self.params, inputs) if self._splits_outliers() else {}
        summary = quantize_graph(proto, self.params, job.gguf_path, job.progress, moments, scratch=_scratch(job))
        if exact_head:
            from gemma_export.exporter.rewrites import Graph
            from gemma_export.exporter.rewrites.exact_head import exact_top_k

            summary["exact_top_k"] = exact_top_k(Graph(proto), self.params.exact_top_k)
            if not summary["exact_top_k"]:  # quantize_graph made the head, so this is our bug
                raise ExportError("the quantized LM head was not found for its exact top-k rewrite")
        if outliers:
            from gemma_export.exporter.rewrites import Graph
            from gemma_export.exporter.rewrites.outlier_channels import split_outlier_channels

            split_outlier_channels(Graph(proto), outliers)
        optimized = optimize_graph(proto, cfg=job.cfg) if job.optimize else Optimized()
        summary["products"] = product_table(proto)
        _save(proto, job.dst)
        fields: dict[str, Any] = {}
        if optimized.shared_cache:
            # The fused graph's cache is one buffer per tensor (a contract change): the
            # manifest says so, and the contract-exact graph from just before the attention
            # fusion ships beside it. CUDA runs that one: the shared-buffer
            # GroupQueryAttention with an attention_bias is verified on the CPU provider only.
            onnx.save(fill_from(optimized.portable, proto), str(job.dst / PORTABLE_MODEL_FILE))
            fields = {"kv_cache": KVLayout.SHARED, "io": io_spec(job.cfg, kv_cache=KVLayout.SHARED),
                      "portable_model_file": PORTABLE_MODEL_FILE, "portable_io": io_spec(job.cfg),
                      "provider_model_files": {"cuda": PORTABLE_MODEL_FILE}}
        return Made(graph=graph_summary(proto, optimized.fusions), kept_fp32=KEPT_FP32_QUANTIZED, summary=summary,
                    fields=fields)


def _load(path: Path):
    """The fp32 graph with its weights left in their file (lazy_weights: a recipe reads
    them a tensor at a time)."""
    from gemma_export.exporter import lazy_weights

    return lazy_weights.load(path)


def _scratch(job: Job) -> Path:
    """Where a recipe's large tensors wait for `_save` (inside the staging directory)."""
    return job.dst / SCRATCH_FILE


def _save(proto, dst: Path) -> None:
    """The graph and its weights file, a tensor at a time; the scratch file is then spent."""
    from gemma_export.exporter import lazy_weights

    lazy_weights.save(proto, dst)
    (dst / SCRATCH_FILE).unlink(missing_ok=True)


SCRATCH_FILE = ".scratch.data"


def _gptq_moments(job: Job, proto, recipe: Recipe):
    """Second moments of every product's input over text the fp32 graph samples, computed
    a layer at a time as quantize_graph asks for them."""
    from gemma_export.exporter.calibrate import InputMoments, sample_tokens

    length = min(recipe.gptq_length, job.cfg.max_position_embeddings)
    with job.progress.stage("sampling calibration text for GPTQ"):
        ids = sample_tokens(job.fp32_model, bos_id=job.cfg.bos_token_id, sequences=recipe.gptq_sequences,
                            length=length, seed=recipe.gptq_seed, progress=job.progress)
    return InputMoments(job.fp32_model, ids, product_inputs(proto))


def _outlier_channels(job: Job, proto, recipe: Recipe, inputs: list[str]) -> dict:
    """{product input: its outlier channels}, from peaks over text the fp32 graph samples
    (never the evaluation text)."""
    from gemma_export.exporter.calibrate import channel_peaks, outlier_channels, sample_tokens

    length = min(recipe.outlier_length, job.cfg.max_position_embeddings)
    with job.progress.stage("sampling calibration text for outlier channels"):
        ids = sample_tokens(job.fp32_model, bos_id=job.cfg.bos_token_id, sequences=recipe.outlier_sequences,
                            length=length, seed=recipe.gptq_seed, progress=job.progress)
    with job.progress.stage("measuring channel peaks"):
        peaks = channel_peaks(job.fp32_model, ids, inputs)
    return {name: outlier_channels(p, recipe.outlier_block, recipe.outlier_ratio) for name, p in peaks.items()}


# -- from what the user asked ------------------------------------------------------------------------

_FLAGS = {"symmetric": ("--asymmetric", "--symmetric"), "gptq": ("--rtn", "--gptq")}  # the CLI's spelling


def _flag(key: str, value: Any) -> str:
    return _FLAGS[key][bool(value)] if key in _FLAGS else "--" + key.replace("_", "-")


def make_recipe(precision: Precision | str, options: RecipeOptions | None = None) -> ArtifactRecipe:
    """The recipe for `precision` with the user's options; UsageError for an option that
    does not apply to it or a value out of range."""
    precision = Precision(precision)
    given = (options or RecipeOptions()).given()
    if precision == Precision.FP32 or precision in (Precision.FP16, Precision.BF16):
        if given:
            flags = ", ".join(_flag(k, v) for k, v in given.items())
            verb = "applies" if len(given) == 1 else "apply"
            targets = "int8, int4 and gguf" if set(given) == {"accuracy_level"} else "int8 and int4"
            raise UsageError(f"--precision {precision.value}: {flags} {verb} to {targets} only")
        if precision == Precision.FP32:
            return Fp32Recipe()
        return NarrowArtifactRecipe(narrow.NarrowRecipe(precision.value))
    if precision == Precision.GGUF and {"block_size", "symmetric", "gptq"} & given.keys():
        raise UsageError("--precision gguf: block size, symmetry and rounding come from the GGUF file")
    bs = given.get("block_size")
    if bs is not None and (bs < 16 or bs & (bs - 1)):
        raise UsageError(f"--block-size {bs}: must be a power of two >= 16")
    if given.get("accuracy_level", 0) not in (0, 1, 2, 3, 4):
        raise UsageError(f"--accuracy-level {given['accuracy_level']}: must be 0..4")
    return IntegerRecipe(dataclasses.replace(RECIPES[precision.value], **given))
