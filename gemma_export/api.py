"""The Python API: export, quantize, verify and load an artifact, typed. The CLI is a thin
layer over these same functions (cli.py parses, calls one of them, prints).

    import gemma_export as ge

    art = ge.export("tiny-gemma3", "out/fp32")                  # -> Artifact, parity verified
    q = ge.quantize(art, "out/int8", precision="int8")         # -> Artifact
    report = ge.verify(q)                                       # -> ParityReport
    gen = ge.load(q)                                            # -> Generator (no torch)
    gen.generate("The capital of France is", max_new_tokens=16)

export / quantize / verify import torch inside the call; this module, `load` and the
runtime never do, so `import gemma_export` stays cheap on a machine without torch.
Failures are the typed errors of gemma_export.errors; a parity miss raises ParityError
(the artifact is written all the same; the error carries the report and the artifact).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from gemma_export.contract import PARITY_FILE, Precision
from gemma_export.errors import ArtifactError, UsageError
from gemma_export.parity import ParityReport, format_report
from gemma_export.runtime.manifest import Manifest

if TYPE_CHECKING:
    from gemma_export.runtime.generate import Generator
    from gemma_export.runtime.session import Provider

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Artifact:
    """An artifact directory and its typed manifest (runtime/manifest.py)."""

    path: Path
    manifest: Manifest
    parity: ParityReport | None = None  # the latest verify's full report (parity.json); None: never verified

    @classmethod
    def open(cls, path: PathLike) -> Artifact:
        """Read an artifact directory: its manifest (validated, see Manifest.read) and its
        parity.json when it has one. ArtifactError if it is not an artifact."""
        import json

        d = Path(path)
        manifest = Manifest.read(d)
        parity = None
        if (d / PARITY_FILE).is_file():
            where = str(d / PARITY_FILE)
            try:
                raw = json.loads((d / PARITY_FILE).read_text())
            except (OSError, ValueError) as e:
                raise ArtifactError(f"{where}: unreadable ({e})") from None
            parity = ParityReport.from_dict(raw, where)
        return cls(d, manifest, parity)

    @property
    def precision(self) -> Precision:
        return self.manifest.precision

    @property
    def size_bytes(self) -> int:
        return self.manifest.size_bytes()

    def result(self, seconds: float) -> dict[str, Any]:
        """The JSON object `gemma-export export / quantize --json` prints for this artifact."""
        report = self.parity
        return {
            "out": str(self.path),
            "model": report.model if report and report.model else self.manifest.source.description,
            "precision": self.precision.value,
            "seconds": round(seconds, 1),
            "size_bytes": self.size_bytes,
            "op_types": self.manifest.graph["op_types"],
            "parity": report.to_dict() if report else None,
            "parity_table": format_report(report) if report else None,
        }


def verify_result(path: PathLike, report: ParityReport) -> dict[str, Any]:
    """The JSON object `gemma-export verify --json` prints."""
    return {"artifact": str(path), "model": report.model, "parity": report.to_dict(),
            "parity_table": format_report(report)}


# -- export / quantize / verify (torch, imported inside) ---------------------------------------


def export(
    model: PathLike | None,
    out: PathLike,
    *,
    precision: Precision | str = Precision.FP32,
    block_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    gptq: bool | None = None,
    max_length: int | None = None,
    force: bool = False,
    verify: bool = True,
    steps: int = 64,
    optimize: bool = True,
    progress: bool = False,
) -> Artifact:
    """Export a checkpoint to an ONNX artifact with a KV cache in `out`, then (`verify`)
    check its parity with the PyTorch model.

    model: a Hugging Face checkpoint directory, a .gguf file, a preset name
        ("tiny-gemma1" / "tiny-gemma2" / "tiny-gemma3"), or None for the bundled Gemma 3 270M.
    precision: fp32, fp16 / bf16 (mixed precision, for CUDA), int8, int4, or gguf (the GGUF's
        own blocks). block_size / symmetric / accuracy_level / gptq tune the integer recipes
        (None: the recipe's default); max_length: the context the artifact advertises.
    force: replace a non-empty `out`. optimize: fuse for ONNX Runtime (off: plain ops).
    steps: greedy decode steps compared by verify. progress: stage timers on stderr.

    Raises UsageError (bad options), CheckpointError, ExportError, and ParityError on a
    parity miss (the artifact is written; the error carries `report` and `artifact`).
    """
    prec = _precision(precision)
    _check_steps(steps)
    from gemma_export.exporter.pipeline import run_export
    from gemma_export.exporter.recipes import RecipeOptions

    options = RecipeOptions(block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level, gptq=gptq)
    return run_export(None if model is None else os.fspath(model), Path(out), precision=prec, options=options,
                      max_length=max_length, force=force, verify=verify, steps=steps, optimize=optimize,
                      progress=_progress(progress))


def quantize(
    artifact: Artifact | PathLike,
    out: PathLike,
    *,
    precision: Precision | str,
    block_size: int | None = None,
    symmetric: bool | None = None,
    accuracy_level: int | None = None,
    gptq: bool | None = None,
    model: PathLike | None = None,
    force: bool = False,
    verify: bool = True,
    steps: int = 64,
    optimize: bool = True,
    progress: bool = False,
) -> Artifact:
    """Make an fp16 / bf16 / int8 / int4 / gguf artifact in `out` from an fp32 one, then
    (`verify`) check its parity with the PyTorch model (`model`, default: the one the
    manifest names). Options and errors as for `export`."""
    prec = _precision(precision)
    _check_steps(steps)
    from gemma_export.exporter.pipeline import run_quantize
    from gemma_export.exporter.recipes import RecipeOptions

    options = RecipeOptions(block_size=block_size, symmetric=symmetric, accuracy_level=accuracy_level, gptq=gptq)
    return run_quantize(_path(artifact), Path(out), precision=prec, options=options, force=force, verify=verify,
                        steps=steps, model=None if model is None else os.fspath(model), optimize=optimize,
                        progress=_progress(progress))


def verify(
    artifact: Artifact | PathLike,
    *,
    model: PathLike | None = None,
    steps: int = 64,
    progress: bool = False,
) -> ParityReport:
    """Check an artifact's checksums and its parity with the PyTorch model (`model`, default:
    the one the manifest names); writes parity.json and the manifest's summary.

    Returns the report when it passes; raises ParityError carrying it when it does not,
    ArtifactError for a directory that is not an intact artifact."""
    _check_steps(steps)
    from gemma_export.exporter.pipeline import run_verify

    return run_verify(_path(artifact), None if model is None else os.fspath(model), steps=steps,
                      progress=_progress(progress))


# -- load (no torch) ------------------------------------------------------------------------------


def load(
    artifact: Artifact | PathLike,
    provider: Provider | str = "auto",
    *,
    threads: int | None = None,
    portable: bool = False,
    verify_checksums: bool = False,
) -> Generator:
    """An artifact ready to generate text on ONNX Runtime: `provider` auto | cpu | cuda,
    `threads` ONNX Runtime's intra-op threads, `portable` the contract-exact graph of a fused
    integer artifact, `verify_checksums` every file's sha256 first (sizes are always checked).

    Raises ArtifactError (not an intact artifact, no tokenizer) and RuntimeConfigError
    (unknown provider, CUDA not available, threads < 1)."""
    from gemma_export.runtime.generate import load_generator

    return load_generator(_path(artifact), provider=provider, threads=threads, portable=portable,
                          verify_checksums=verify_checksums)


# -- argument checks shared by the functions above ----------------------------------------------


def _path(artifact: Artifact | PathLike) -> Path:
    return artifact.path if isinstance(artifact, Artifact) else Path(artifact)


def _precision(value: Precision | str) -> Precision:
    try:
        return Precision(value)
    except ValueError:
        known = ", ".join(p.value for p in Precision)
        raise UsageError(f"precision {value!r} is not one of {known}") from None


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be an integer >= 1, got {steps!r}")


def _progress(enabled: bool):
    from gemma_export.progress import Progress

    return Progress(enabled=enabled)


__all__ = ["Artifact", "export", "quantize", "verify", "load", "verify_result"]
