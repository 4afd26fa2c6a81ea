"""gemma-export: Gemma from PyTorch to ONNX Runtime, with parity proved.

The Python API (api.py; the CLI is a thin layer over it):

    import gemma_export as ge

    art = ge.export("tiny-gemma3", "out/fp32")              # -> Artifact (parity verified)
    q = ge.quantize(art, "out/int8", precision="int8")     # -> Artifact
    report = ge.verify(q)                                   # -> ParityReport
    gen = ge.load(q)                                        # -> Generator, no torch
    text = gen.generate("The capital of France is", max_new_tokens=16)

The package is split so that a deployment needs no torch:
    gemma_export.models    PyTorch Gemma 1/2/3 and checkpoint loaders   (torch)
    gemma_export.exporter  trace to ONNX, quantize, verify, artifacts     (torch)
    gemma_export.runtime   ONNX Runtime session, tokenizer, generation    (no torch)
Importing this package loads neither torch nor ONNX Runtime: export / quantize / verify
import torch when called, `load` imports ONNX Runtime, and the runtime's classes below
(Generator, SamplingConfig, TextResult, format_chat) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gemma_export.api import Artifact, export, load, quantize, verify
from gemma_export.contract import Precision
from gemma_export.errors import (
    ArtifactError, CheckpointError, ExportError, GemmaExportError, ParityError, RuntimeConfigError, UsageError,
)
from gemma_export.parity import Metric, ParityReport
from gemma_export.runtime.manifest import Manifest

if TYPE_CHECKING:
    from gemma_export.runtime.generate import Generator, Sampling, SamplingConfig, TextResult
    from gemma_export.runtime.tokenizer import format_chat

__version__ = "0.1.0"

# Runtime names that would import ONNX Runtime / sentencepiece: resolved on first access.
_LAZY = {
    "Generator": "gemma_export.runtime.generate",
    "Sampling": "gemma_export.runtime.generate",
    "SamplingConfig": "gemma_export.runtime.generate",
    "TextResult": "gemma_export.runtime.generate",
    "format_chat": "gemma_export.runtime.tokenizer",
}

__all__ = [
    "export", "quantize", "verify", "load",
    "Artifact", "Manifest", "ParityReport", "Metric", "Precision",
    "Generator", "Sampling", "SamplingConfig", "TextResult", "format_chat",
    "GemmaExportError", "UsageError", "CheckpointError", "ExportError", "ArtifactError", "RuntimeConfigError",
    "ParityError",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gemma_export' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
