"""A graph whose weights stay in their file until a recipe reads them, one tensor at a time.

    load(path) -> proto         the graph; its external initializers of SMALL bytes or more
                                still point into the weights file beside it (by absolute
                                path), smaller ones are read inline as onnx.load reads them
    array(t) -> ndarray         one initializer's values: a read-only memory map of its bytes
                                for one still in the file, numpy_helper.to_array otherwise
    Initializers(scratch)       the tensors a recipe makes: `.add(array, name)` keeps a small
                                one in memory and writes a large one to a scratch file at once
                                (a TensorProto cannot hold 2 GB: protobuf's limit)
    save(proto, dst)            dst/MODEL_FILE + dst/DATA_FILE, a tensor at a time: what the
                                recipe made (raw_data, freed as it is written; scratch-file
                                ones copied) and what it left in the source file (copied too)

Why: onnx.load reads every weight into memory and onnx.save writes from memory, so a
recipe held the whole fp32 model and its own output at once. Gemma 4 E2B's fp32 weights
are 18.5 GB (its per-layer embedding table alone 9.4 GB) on a 24 GB machine; read this
way a recipe holds its output and the tensor in hand (docs/design.md, "Gemma 4").

`save` moves what `goes_external` says (what onnx.save(..., save_as_external_data=True,
size_threshold=SMALL) would move, and what is in a file already); optimize.skeleton /
fill_from ask the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from gemma_export.contract import DATA_FILE, MODEL_FILE
from gemma_export.errors import ArtifactError

SMALL = 1024  # bytes: initializers this small stay inline in the graph
_COPY_SLICE = 64 << 20  # bytes copied from the source file per read
SCRATCH_BYTES = 256 << 20  # a made tensor this large goes to the scratch file, not the proto
_ALIGN = 64  # each tensor starts on a 64-byte boundary of the weights file


def load(path: Path) -> onnx.ModelProto:
    """The graph at `path` without reading its external weights; each of them is pointed
    at its file by absolute path (which must lie in the graph's own folder or below it:
    an artifact's transformers.js folder holds the weights file)."""
    path = Path(path)
    base = path.parent.resolve()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (OSError, onnx.checker.ValidationError, DecodeError) as e:
        raise ArtifactError(f"{path}: cannot read the graph ({str(e).strip().splitlines()[0]})") from e
    for t in _tensors(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = _info(t)
        where = (base / info.get("location", "")).resolve()
        if not where.is_relative_to(base) or not where.is_file():
            raise ArtifactError(
                f"{path}: {t.name}'s weights file {info.get('location')!r} is not in the graph's folder")
        offset, length = int(info.get("offset", 0)), int(info["length"])
        if length < SMALL:
            # Read small ones now, as onnx.load would: they stay inline in the graph (the
            # exporter's own threshold put some in the file), so every graph written from
            # this one (a portable sibling too) holds them without the weights file.
            with open(where, "rb") as f:
                f.seek(offset)
                raw = f.read(length)
            if len(raw) != length:
                raise ArtifactError(f"{path}: {t.name}'s weights file ends before its {length} bytes")
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
            t.raw_data = raw
            continue
        _set_info(t, str(where), offset, length)
    return proto


def array(t: onnx.TensorProto) -> np.ndarray:
    """The values of initializer `t`: mapped from its file (read-only, nothing read until
    used) if `load` left it there, else decoded from the proto."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = _info(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(t.dims)
    length = int(info["length"])
    if length != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ArtifactError(f"{t.name}: {length} bytes in the weights file for shape {list(shape)}")
    raw = np.memmap(info["location"], dtype=np.uint8, mode="r", offset=int(info.get("offset", 0)), shape=(length,))
    return raw.view(dtype).reshape(shape)


class Initializers(list):
    """New initializers in the order made; those of SCRATCH_BYTES or more live in
    `scratch` (a file `save` copies from; the caller removes it) when one is given."""

    def __init__(self, scratch: Path | None = None):
        super().__init__()
        self.scratch = Path(scratch).resolve() if scratch is not None else None

    def add(self, a: np.ndarray, name: str) -> onnx.TensorProto:
        if self.scratch is None or a.nbytes < SCRATCH_BYTES:
            t = numpy_helper.from_array(a, name)
        else:
            a = np.ascontiguousarray(a)
            with open(self.scratch, "ab") as f:
                offset = _pad(f)
                a.reshape(-1).view(np.uint8).tofile(f)
            t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
            t.data_location = onnx.TensorProto.EXTERNAL
            _set_info(t, str(self.scratch), offset, a.nbytes)
        self.append(t)
        return t


def save(proto: onnx.ModelProto, dst: Path) -> None:
    """Write `proto` as dst/MODEL_FILE with its large initializers in dst/DATA_FILE, one
    tensor at a time; the proto is left pointing at dst/DATA_FILE (as onnx.save leaves it)."""
    dst = Path(dst)
    with open(dst / DATA_FILE, "wb") as f:
        for t in _tensors(proto):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = _info(t)
                if Path(info["location"]) == (dst / DATA_FILE).resolve():
                    raise ArtifactError(f"{t.name}: would be copied from the file being written")
                offset = _pad(f)
                _copy(info["location"], int(info.get("offset", 0)), int(info["length"]), f)
                _set_info(t, DATA_FILE, offset, int(info["length"]))
            elif goes_external(t):
                offset = _pad(f)
                f.write(t.raw_data)
                _set_info(t, DATA_FILE, offset, len(t.raw_data))
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")
    onnx.save(proto, str(dst / MODEL_FILE))


def goes_external(t: onnx.TensorProto) -> bool:
    """Whether `save` puts `t` in the weights file: already in a file, or raw data of SMALL
    bytes or more (onnx.external_data_helper's own test, sys.getsizeof included)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return True
    return t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= SMALL


def _tensors(proto: onnx.ModelProto):
    """Every initializer, in subgraphs too (what onnx.save would move)."""
    def walk(g: onnx.GraphProto):
        yield from g.initializer
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from walk(a.g)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for sub in a.graphs:
                        yield from walk(sub)
    yield from walk(proto.graph)


def _info(t: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _set_info(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v


def _pad(f) -> int:
    f.seek(0, 2)
    at = f.tell()
    gap = -at % _ALIGN
    if gap:
        f.write(b"\0" * gap)
    return at + gap


def _copy(src: str, offset: int, length: int, f) -> None:
    with open(src, "rb") as s:
        s.seek(offset)
        left = length
        while left:
            chunk = s.read(min(left, _COPY_SLICE))
            if not chunk:
                raise ArtifactError(f"{src}: ends before offset {offset} + {length}")
            f.write(chunk)
            left -= len(chunk)
