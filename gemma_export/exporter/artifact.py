"""The artifact directory: what it holds, and writing it atomically.

    out/
      model.onnx                      the decoder graph (weights: manifest data_file)
      manifest.json                   config, precision, I/O spec, checksums, versions, parity
      parity.json                     the full verify report (written by verify)
      tokenizer.model                 SentencePiece (copied, or built from a GGUF vocabulary)
      config.json, generation_config.json   for clients that read a Hugging Face model folder
      tokenizer.json, tokenizer_config.json, special_tokens_map.json, genai_config.json,
      onnx/model{suffix}.onnx(_data)  transformers.js's folder (also Optimum's graph); the
                                      weights live there and every graph reads them
                                      (exporter/clients.py; bf16 keeps model.onnx.data)

Everything is built in a hidden sibling directory and renamed onto `out` at the end, so
an error or Ctrl-C leaves nothing at `out` (and an old artifact replaced with --force
stays whole until the new one is complete). The staging directory is private while it is
built (mkdtemp's 0700, and onnx writes external data 0600); before the rename every
directory and file gets the mode a plain mkdir / open would give under the caller's umask,
because an artifact is a deliverable that other users and containers read.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Iterator

from gemma_export import __version__
from gemma_export.errors import ExportError
from gemma_export.contract import MANIFEST_FILE, PARITY_FILE
from gemma_export.runtime.manifest import FileEntry, sha256_file

# Not checksummed: the manifest itself, and the parity report verify may rewrite.
_UNLISTED = {MANIFEST_FILE, PARITY_FILE}


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse what would clobber or cannot be written, before any work is done. Missing
    parent directories are fine: they are created (and removed again if the export fails)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"--out {out}: directory is not empty (pass --force to replace it)")
    anchor = _existing_ancestor(out.absolute().parent)
    if not anchor.is_dir():
        raise ExportError(f"--out {out}: {anchor} is not a directory")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: {anchor} is not writable")


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@contextmanager
def staging_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty sibling directory; on success rename it onto `out`, on any error
    (KeyboardInterrupt included) remove it, and any parent directories made for it."""
    check_out_dir(out, force)
    parent = out.absolute().parent
    made = []
    p = parent
    while not p.exists():
        made.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        _remove_empty(made)
        raise ExportError(f"--out {out}: cannot create a directory beside it ({e.strerror})") from e
    try:
        yield tmp
        publish_modes(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            out.rename(old / "artifact")
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_modes(root: Path) -> None:
    """Give `root` and everything under it the modes mkdir (0777) and open (0666) give
    under the umask: never tighter than the umask asks, never looser."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories we created (deepest first), if nothing else was put there."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break


def file_table(d: Path) -> dict[str, FileEntry]:
    """Every file by its path relative to `d` (top level first, then subfolders such as onnx/),
    each file on disk once (a hard link to one already listed is left out), so sizes add up to
    the disk the artifact takes."""
    top = sorted(p for p in d.iterdir() if p.is_file() and p.name not in _UNLISTED)
    nested = sorted(p for p in d.rglob("*") if p.is_file() and p.parent != d)
    table, seen = {}, set()
    for p in top + nested:
        st = p.stat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        table[p.relative_to(d).as_posix()] = FileEntry(size=st.st_size, sha256=sha256_file(p))
    return table


def versions() -> dict[str, str]:
    out = {"gemma-export": __version__, "python": platform.python_version()}
    for pkg in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "gguf", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out

