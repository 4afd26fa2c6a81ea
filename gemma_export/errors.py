"""The error hierarchy. Every user-facing failure is one of these; the CLI turns
them into one line on stderr and an exit code (see cli.py). Internal invariants
use `assert`, never these."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gemma_export.api import Artifact
    from gemma_export.parity import ParityReport


class GemmaExportError(Exception):
    """Base class: a failure the user can act on. The message is one line."""

    exit_code = 1


class UsageError(GemmaExportError):
    """Options that cannot go together (a flag that does not apply to the precision, a
    value out of range): the command line is wrong, not the input. Exit 2, like Click's."""

    exit_code = 2


class CheckpointError(GemmaExportError):
    """A checkpoint (directory, safetensors, GGUF, preset name) cannot be loaded."""


class ExportError(GemmaExportError):
    """Tracing or writing an artifact failed."""


class ArtifactError(GemmaExportError):
    """A directory is not a valid artifact (missing files, bad checksums, bad manifest)."""


class RuntimeConfigError(GemmaExportError):
    """Bad runtime options: provider, sampling numbers, prompt too long, ..."""


class ParityError(GemmaExportError):
    """An artifact missed a parity threshold. Its own exit code so scripts can tell.
    The artifact is written all the same: `report` is the typed ParityReport that missed,
    `artifact` the Artifact (None from `verify`, which was given one), `result` the
    command's JSON object so the CLI can still print the table."""

    exit_code = 3

    def __init__(self, message: str, result: dict | None = None, *, report: ParityReport | None = None,
                 artifact: Artifact | None = None):
        super().__init__(message)
        self.result = result
        self.report = report
        self.artifact = artifact
