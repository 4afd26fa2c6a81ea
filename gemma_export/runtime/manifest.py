"""manifest.json as a typed, versioned record, and the checks that make reading an artifact safe.

The exporter builds a `Manifest` and writes it; the runtime, the server, `verify` and
`inspect` read it with `Manifest.read(dir)`. Reading is a trust boundary (artifacts travel
between machines and people), so `read` validates every field it uses and names the bad
one, and every path the manifest names (graphs, weights, tokenizer, the listed files) must
resolve inside the artifact directory, symlinks included, or the artifact is refused.
No torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma_export.contract import MANIFEST_FILE, KVLayout, Precision
from gemma_export.errors import ArtifactError

FORMAT = "gemma-export"
FORMAT_VERSION = 1


def write_json(path: Path, obj: Any, compact: bool = False) -> None:
    """Write via a temporary file and rename, so a reader never sees half a JSON file (the
    manifest, and the exporter's other JSON files). `compact`: no indentation, UTF-8 as is
    (tokenizer.json: 14 MB instead of 38)."""
    tmp = path.with_name(f".{path.name}.tmp")
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")) if compact else json.dumps(obj, indent=2)
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Source:
    """Where the weights came from: enough for `verify` to load the same model again."""

    spec: str | None  # what the user passed (None: the bundled default model)
    kind: str  # hf | gguf | preset
    path: str | None  # the checkpoint's absolute path on the exporting machine
    description: str


@dataclass
class Manifest:
    """Everything a consumer needs besides the graphs. Field order is the JSON key order."""

    model_file: str  # the graph the artifact's runtime runs by default
    data_file: str  # the weights file every graph reads
    precision: Precision
    recipe: dict[str, Any]  # the recipe's own parameters (Recipe.to_dict)
    kept_fp32: list[str]  # what a narrow or integer recipe left in fp32, in words
    source: Source
    config: dict[str, Any]  # models.config.GemmaConfig.to_dict()
    layer_types: list[str]
    max_length: int  # the context the artifact was exported for
    io: dict[str, Any]  # contract.io_spec of model_file
    opset: int  # model_file's default-domain opset
    graph: dict[str, Any]  # node count, op histogram, fusions applied
    onnxruntime_ops: list[str]  # contrib ops model_file needs; [] = standard ONNX
    tokenizer: str | None  # SentencePiece file, None for an artifact without one
    versions: dict[str, str]  # the tools that wrote it
    # Recipe outputs (absent from fp32 exports):
    quantized: dict[str, Any] | None = None  # the recipe's summary of what it did per weight
    derived_from: str | None = None  # the fp32 artifact `quantize` started from
    kv_cache: KVLayout | None = None  # SHARED for the fused integer graphs; absent = CONCAT
    portable_model_file: str | None = None  # the contract-exact sibling of a fused graph
    portable_io: dict[str, Any] | None = None  # contract.io_spec of portable_model_file (concat layout)
    provider_model_files: dict[str, str] = field(default_factory=dict)  # provider -> graph, where not model_file
    # Other runtimes: {client: {role: path}}, e.g. {"transformers.js": {"graph": "onnx/model.onnx",
    # "data": ..., "dtype": "fp32"}} (exporter/clients.py); absent from artifacts made before them.
    clients: dict[str, dict[str, str]] = field(default_factory=dict)
    parity: dict[str, Any] | None = None  # verify's summary: {"passed", "metrics"}
    files: dict[str, FileEntry] = field(default_factory=dict)  # every file but the manifest and parity.json
    format_version: int = FORMAT_VERSION

    # -- what readers ask ------------------------------------------------------------------

    @property
    def layout(self) -> KVLayout:
        return self.kv_cache or KVLayout.CONCAT

    def graph_file(self, provider: str, portable: bool = False) -> str:
        """The graph to run on `provider` ("cpu" | "cuda"); `portable` asks for the
        contract-exact sibling where model_file is a fused shared-cache graph."""
        if portable and self.portable_model_file:
            return self.portable_model_file
        return self.provider_model_files.get(provider, self.model_file)

    def graph_io(self, graph: str) -> dict[str, Any]:
        """The io_spec of `graph`, one of this artifact's graphs: the portable sibling's own
        where the manifest has it (artifacts before it: the model_file's, whose entries
        describe the same tensors, all full)."""
        if graph == self.portable_model_file and self.portable_io is not None:
            return self.portable_io
        return self.io

    def size_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": FORMAT, "format_version": self.format_version}
        for f in dataclasses.fields(self):
            if f.name == "format_version":
                continue
            v = getattr(self, f.name)
            if f.name in _OPTIONAL and v in (None, {}):
                continue  # recipe outputs appear only where a recipe made them
            if f.name == "files":
                v = {k: dataclasses.asdict(e) for k, e in v.items()}
            elif f.name == "source":
                v = dataclasses.asdict(v)
            elif isinstance(v, (Precision, KVLayout)):
                v = v.value
            d[f.name] = v
        return d

    def write(self, artifact_dir: Path | str) -> None:
        write_json(Path(artifact_dir) / MANIFEST_FILE, self.to_dict())

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_FILE) -> Manifest:
        """Validate and type a parsed manifest; an ArtifactError naming the field otherwise."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ArtifactError(f"{where}: not a gemma-export manifest")
        v = _Fields(raw, where)
        version = v.int_("format_version")
        if version > FORMAT_VERSION:
            raise ArtifactError(f"{where}: format version {version} is newer than this tool reads ({FORMAT_VERSION})")
        src = v.dict_("source")
        sv = _Fields(src, f"{where}: source")
        kv = v.opt("kv_cache", str)
        pmf = v.opt("provider_model_files", dict) or {}
        pv = _Fields(pmf, f"{where}: provider_model_files")
        return cls(
            model_file=v.str_("model_file"),
            data_file=v.str_("data_file"),
            precision=v.enum("precision", Precision),
            recipe=v.dict_("recipe"),
            kept_fp32=v.list_("kept_fp32", str),
            source=Source(spec=sv.opt("spec", str), kind=sv.str_("kind"), path=sv.opt("path", str),
                          description=sv.str_("description")),
            config=_config(v.dict_("config"), where),
            layer_types=v.list_("layer_types", str),
            max_length=v.int_("max_length"),
            io=_io(v.dict_("io"), where),
            opset=v.int_("opset"),
            graph=v.dict_("graph"),
            onnxruntime_ops=v.list_("onnxruntime_ops", str),
            tokenizer=v.opt("tokenizer", str),
            versions=v.dict_("versions"),
            quantized=v.opt("quantized", dict),
            derived_from=v.opt("derived_from", str),
            kv_cache=None if kv is None else v.enum("kv_cache", KVLayout),
            portable_model_file=v.opt("portable_model_file", str),
            portable_io=None if v.opt("portable_io", dict) is None else _io(v.dict_("portable_io"), where),
            provider_model_files={k: pv.str_(k) for k in pmf},
            clients=_clients(v.opt("clients", dict) or {}, where),
            parity=v.opt("parity", dict),
            files={name: _file_entry(e, f"{where}: files[{name!r}]") for name, e in v.dict_("files").items()},
            format_version=version,
        )

    @classmethod
    def read(cls, artifact_dir: Path | str) -> Manifest:
        """Parse and validate DIR/manifest.json, and check that every path it names stays
        inside DIR. One-line ArtifactError for anything that is not a readable artifact."""
        d = Path(artifact_dir)
        if not d.exists():
            raise ArtifactError(f"{d}: no such directory")
        if not d.is_dir():
            raise ArtifactError(f"{d}: not a directory (an artifact is a directory with {MANIFEST_FILE})")
        path = d / MANIFEST_FILE
        if not path.is_file():
            raise ArtifactError(f"{d}: not an artifact (no {MANIFEST_FILE})")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable manifest ({e})") from e
        m = cls.from_dict(raw, str(path))
        m.check_paths(d)
        return m

    def check_paths(self, artifact_dir: Path | str) -> None:
        """Every file the manifest names resolves inside the artifact directory."""
        d = Path(artifact_dir)
        named = {"model_file": self.model_file, "data_file": self.data_file}
        if self.tokenizer is not None:
            named["tokenizer"] = self.tokenizer
        if self.portable_model_file is not None:
            named["portable_model_file"] = self.portable_model_file
        named |= {f"provider_model_files[{k!r}]": v for k, v in self.provider_model_files.items()}
        named |= {f"clients[{c!r}][{r!r}]": p for c, roles in self.clients.items() for r, p in roles.items()
                  if r != "dtype"}
        named |= {f"files[{k!r}]": k for k in self.files}
        for fld, name in named.items():
            inside_artifact(d, name, f"{d / MANIFEST_FILE}: {fld}")

    def check_files(self, artifact_dir: Path | str, *, hashes: bool = True) -> None:
        """Every listed file exists with its size (and sha256 when `hashes`)."""
        d = Path(artifact_dir)
        for name, entry in self.files.items():
            p = d / name
            if not p.is_file():
                raise ArtifactError(f"{p}: missing (listed in {MANIFEST_FILE})")
            size = p.stat().st_size
            if size != entry.size:
                raise ArtifactError(f"{p}: size {size} != {entry.size} in {MANIFEST_FILE} (truncated or replaced)")
            if hashes and sha256_file(p) != entry.sha256:
                raise ArtifactError(f"{p}: sha256 does not match {MANIFEST_FILE} (corrupt or modified)")


_OPTIONAL = {"quantized", "derived_from", "kv_cache", "portable_model_file", "portable_io", "provider_model_files",
             "clients"}


def inside_artifact(d: Path, name: str, what: str) -> Path:
    """`d / name`, refused unless it is a relative path that stays inside `d` once every
    symlink is resolved (a crafted manifest must not make us load a graph from elsewhere)."""
    if not name or os.path.isabs(name) or "\\" in name:
        raise ArtifactError(f"{what}: {name!r} is not a path inside the artifact")
    root = d.resolve()
    target = (d / name).resolve()
    if target != root and root not in target.parents:
        raise ArtifactError(f"{what}: {name!r} points outside the artifact directory")
    return d / name


class _Fields:
    """Typed access to one JSON object, with errors that name the field."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def _get(self, key: str, kind: type | tuple[type, ...], what: str):
        if key not in self.raw:
            raise ArtifactError(f"{self.where}: manifest has no {key!r}")
        v = self.raw[key]
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ArtifactError(f"{self.where}: {key!r} must be {what}, got {type(v).__name__}")
        return v

    def str_(self, key: str) -> str:
        return self._get(key, str, "a string")

    def int_(self, key: str) -> int:
        return self._get(key, int, "an integer")

    def dict_(self, key: str) -> dict:
        return self._get(key, dict, "an object")

    def list_(self, key: str, item: type | tuple[type, ...]) -> list:
        v = self._get(key, list, "a list")
        if not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
            raise ArtifactError(f"{self.where}: {key!r} has an item of the wrong type")
        return v

    def opt(self, key: str, kind: type):
        if self.raw.get(key) is None:
            return None
        return self._get(key, kind, {str: "a string", dict: "an object"}.get(kind, kind.__name__))

    def enum(self, key: str, kind: type):
        v = self.str_(key)
        try:
            return kind(v)
        except ValueError:
            raise ArtifactError(f"{self.where}: {key!r} is {v!r}, not one of "
                                f"{', '.join(e.value for e in kind)}") from None


def _file_entry(raw: Any, where: str) -> FileEntry:
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: must be an object with size and sha256")
    v = _Fields(raw, where)
    return FileEntry(size=v.int_("size"), sha256=v.str_("sha256"))


# The config fields the runtime reads; the rest is the exporter's (GemmaConfig.from_dict).
_RUNTIME_CONFIG = {"num_hidden_layers": int, "num_key_value_heads": int, "head_dim": int, "vocab_size": int,
                   "max_position_embeddings": int, "pad_token_id": int, "bos_token_id": int}


def _config(raw: dict, where: str) -> dict:
    v = _Fields(raw, f"{where}: config")
    for key in _RUNTIME_CONFIG:
        if v.int_(key) < 0:
            raise ArtifactError(f"{where}: config {key!r} must be >= 0")
    v.list_("eos_token_ids", int)
    return raw


def _clients(raw: dict, where: str) -> dict[str, dict[str, str]]:
    v = _Fields(raw, f"{where}: clients")
    out = {}
    for client in raw:
        roles = v.dict_(client)
        rv = _Fields(roles, f"{where}: clients[{client!r}]")
        out[client] = {role: rv.str_(role) for role in roles}
    return out


def _io(raw: dict, where: str) -> dict:
    v = _Fields(raw, f"{where}: io")
    for side in ("inputs", "outputs"):
        for name, spec in v.dict_(side).items():
            s = _Fields(spec if isinstance(spec, dict) else {}, f"{where}: io.{side}[{name!r}]")
            s.str_("dtype")
            s.list_("shape", (int, str))
    return raw
