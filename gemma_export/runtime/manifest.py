"""Reading an artifact directory: manifest.json and the checksums it lists. No torch.

The exporter writes artifacts (exporter/artifact.py); everything that only reads one,
the runtime, the server and `verify`, goes through here, so "is this an artifact and is
it intact" has one answer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gemma_export.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(artifact_dir: Path | str) -> dict[str, Any]:
    """Parse manifest.json; an ArtifactError with one line if the directory is not an artifact."""
    d = Path(artifact_dir)
    if not d.exists():
        raise ArtifactError(f"{d}: no such directory")
    if not d.is_dir():
        raise ArtifactError(f"{d}: not a directory (an artifact is a directory with {MANIFEST})")
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d}: not an artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != "gemma-export":
        raise ArtifactError(f"{path}: not a gemma-export manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {manifest['format_version']} is newer than this tool reads")
    for key in ("config", "files", "io", "precision", "model_file"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest has no {key!r}")
    return manifest


def check_files(artifact_dir: Path | str, manifest: dict[str, Any] | None = None, *, hashes: bool = True) -> None:
    """Every file the manifest lists exists with its size (and sha256 when `hashes`)."""
    d = Path(artifact_dir)
    manifest = manifest or read_manifest(d)
    for name, entry in manifest["files"].items():
        p = d / name
        if not p.is_file():
            raise ArtifactError(f"{p}: missing (listed in {MANIFEST})")
        if p.stat().st_size != entry["size"]:
            raise ArtifactError(f"{p}: size {p.stat().st_size} != {entry['size']} in {MANIFEST} (truncated or replaced)")
        if hashes and sha256_file(p) != entry["sha256"]:
            raise ArtifactError(f"{p}: sha256 does not match {MANIFEST} (corrupt or modified)")
