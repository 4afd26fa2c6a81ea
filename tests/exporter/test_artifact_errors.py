"""The export pipeline and the artifact readers on bad input: an --out that is in the way,
a failure or Ctrl-C half way through an export, and artifacts that are not artifacts or
were damaged after export. Each is a typed error with a one-line message, and an export
that does not finish leaves nothing behind (artifact.staging_dir's promise).

tiny-gemma3 is exported once per module (unverified: verification is not the point here)
and copied for every destructive test; one test exports for real with --force.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gemma_export.errors import ArtifactError, ExportError
from gemma_export.exporter import pipeline
from gemma_export.contract import DATA_FILE, MODEL_FILE
from gemma_export.exporter.export import ExportResult
from gemma_export.exporter.pipeline import export_artifact, verify_dir
from gemma_export.exporter.tokenizer_source import preset_tokenizer
from gemma_export.runtime.generate import load_generator
from gemma_export.contract import MANIFEST_FILE as MANIFEST
from gemma_export.runtime.manifest import Manifest, sha256_file
from gemma_export.runtime.session import DecoderSession

PRESET = "tiny-gemma3"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / PRESET
    export_artifact(PRESET, out, verify=False)
    return out


@pytest.fixture
def artifact(exported, tmp_path) -> Path:
    """A private copy of the exported artifact, free to damage."""
    return Path(shutil.copytree(exported, tmp_path / "art"))


def one_line(exc_info, *needles: str) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Staging (.out.tmp-*) or replaced (.out.old-*) siblings an export left behind."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def copying_export(src: Path):
    """A stand-in for pipeline.export_graph that copies an already traced graph (saves ~10 s of tracing)."""

    def fake(ckpt, out_dir):
        import onnx

        # As the tracer writes it: the weights in DATA_FILE beside the graph.
        onnx.save(onnx.load(str(src / MODEL_FILE)), str(Path(out_dir) / MODEL_FILE), save_as_external_data=True,
                  location=DATA_FILE, size_threshold=1024)
        return ExportResult(Path(out_dir) / MODEL_FILE)

    return fake


# -- --out in the way ---------------------------------------------------------------------------


def test_non_empty_out_without_force(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    # It must refuse before loading anything (a real model takes minutes to load).
    monkeypatch.setattr(pipeline, "load_model", lambda spec: pytest.fail("loaded before checking --out"))
    with pytest.raises(ExportError) as e:
        export_artifact(PRESET, out, verify=False)
    one_line(e, str(out), "--force")
    assert snapshot(out) == before
    assert leftovers(out) == []


@pytest.mark.slow
def test_force_replaces_with_a_valid_artifact(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("old")
    res = export_artifact(PRESET, out, force=True, verify=True, steps=2)
    assert res["parity"]["passed"]
    assert not (out / "notes.txt").exists()
    manifest = Manifest.read(out)
    manifest.check_files(out, hashes=True)
    assert manifest.parity["passed"]
    assert verify_dir(out, steps=2)["parity"]["passed"]
    assert leftovers(out) == []


def test_out_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    with pytest.raises(ExportError) as e:
        export_artifact(PRESET, out, force=True, verify=False)
    one_line(e, str(out), "not a directory")
    assert out.read_text() == "not a directory"


def test_missing_parents_are_created_and_removed_on_failure(tmp_path, monkeypatch, exported):
    out = tmp_path / "no" / "such" / "out"
    def failing(ckpt, out_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipeline, "export_graph", failing)
    with pytest.raises(RuntimeError):
        export_artifact(PRESET, out, verify=False)
    assert not (tmp_path / "no").exists()  # nothing half-made left behind
    monkeypatch.setattr(pipeline, "export_graph", copying_export(exported))
    export_artifact(PRESET, out, verify=False)
    assert (out / "manifest.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 directory anyway; see the next test")
def test_unwritable_parent(tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ExportError) as e:
            export_artifact(PRESET, parent / "out", verify=False)
        one_line(e, "not writable")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_cannot_create_staging_dir(tmp_path, monkeypatch, exported):
    """What an unwritable parent looks like past the access check (and the case root can
    still test): creating the staging directory fails."""
    from gemma_export.exporter import artifact as art

    def deny(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(art.tempfile, "mkdtemp", deny)
    monkeypatch.setattr(pipeline, "export_graph", copying_export(exported))
    out = tmp_path / "out"
    with pytest.raises(ExportError) as e:
        export_artifact(PRESET, out, verify=False)
    one_line(e, str(out), "Permission denied")
    assert list(tmp_path.iterdir()) == []


# -- failure half way: nothing left behind ----------------------------------------------------------


def _raise_in(stage: str, exc: BaseException, exported: Path, monkeypatch) -> list[str]:
    """Make `stage` raise `exc` after it has been called (and written files); return a log."""
    calls: list[str] = []
    copy = copying_export(exported)

    def export_then_raise(ckpt, out_dir):
        calls.append("export_onnx")
        copy(ckpt, out_dir)  # half an artifact is on disk when it fails
        raise exc

    def verify_raise(*a, **k):
        calls.append("verify_artifact")
        raise exc

    if stage == "export_onnx":
        monkeypatch.setattr(pipeline, "export_graph", export_then_raise)
    else:
        monkeypatch.setattr(pipeline, "export_graph", copy)
        monkeypatch.setattr(pipeline, "verify_artifact", verify_raise)
    return calls


FAILURES = [
    (stage, exc)
    for stage in ("export_onnx", "verify_artifact")
    for exc in (RuntimeError("boom"), KeyboardInterrupt(), ExportError("tracing failed"))
]


@pytest.mark.parametrize("stage,exc", FAILURES, ids=[f"{s}-{type(e).__name__}" for s, e in FAILURES])
def test_failure_leaves_nothing(tmp_path, monkeypatch, exported, stage, exc):
    calls = _raise_in(stage, exc, exported, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(type(exc)):
        export_artifact(PRESET, out, verify=True, steps=2)
    assert calls == [stage]
    assert not out.exists()
    assert leftovers(out) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stage", ["export_onnx", "verify_artifact"])
def test_interrupted_force_keeps_old_artifact(artifact, monkeypatch, exported, stage):
    before = snapshot(artifact)
    _raise_in(stage, KeyboardInterrupt(), exported, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_artifact(PRESET, artifact, force=True, verify=True, steps=2)
    assert snapshot(artifact) == before
    assert leftovers(artifact) == []


# -- not an artifact, or a damaged one --------------------------------------------------------------


def test_verify_dir_on_a_non_artifact(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ArtifactError) as e:
        verify_dir(tmp_path)
    one_line(e, str(tmp_path), MANIFEST)


def test_verify_dir_on_a_missing_dir(tmp_path):
    with pytest.raises(ArtifactError) as e:
        verify_dir(tmp_path / "nope")
    one_line(e, "nope", "no such directory")


def test_verify_dir_on_a_file(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"x")
    with pytest.raises(ArtifactError) as e:
        verify_dir(f)
    one_line(e, str(f), "not a directory")


def _data(artifact: Path) -> Path:
    return artifact / _raw(artifact)["data_file"]


def test_flipped_byte_fails_checksum(artifact):
    data = _data(artifact)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError) as e:
        verify_dir(artifact, steps=2)
    one_line(e, str(data), "sha256")
    with pytest.raises(ArtifactError):
        DecoderSession(artifact, provider="cpu", verify_checksums=True)


def test_truncated_data_file(artifact):
    data = _data(artifact)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 4096)
    # The session checks sizes even without hashing (cheap, and ORT would read past the end).
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, str(data), "truncated", str(size))
    with pytest.raises(ArtifactError):
        verify_dir(artifact, steps=2)


def test_missing_data_file(artifact):
    data = _data(artifact)
    data.unlink()
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, str(data.relative_to(artifact)), "missing")
    with pytest.raises(ArtifactError):
        verify_dir(artifact, steps=2)


@pytest.mark.parametrize(
    "data,needle",
    [
        (b'{"format": "gemma-export", "files": {', "unreadable manifest"),
        (b"\xff\xfe\x00 not utf-8", "unreadable manifest"),
        (b'["a list"]', "not a gemma-export manifest"),
        (b'{"format": "something-else"}', "not a gemma-export manifest"),
    ],
    ids=["cut", "binary", "list", "other-format"],
)
def test_corrupt_manifest(artifact, data, needle):
    (artifact / MANIFEST).write_bytes(data)
    for load in (lambda: verify_dir(artifact, steps=2), lambda: DecoderSession(artifact, provider="cpu")):
        with pytest.raises(ArtifactError) as e:
            load()
        one_line(e, MANIFEST, needle)


def test_manifest_from_a_newer_version(artifact):
    m = _raw(artifact)
    m["format_version"] = 99
    (artifact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, "format version 99")


def test_manifest_missing_a_key(artifact):
    m = _raw(artifact)
    del m["io"]
    (artifact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        verify_dir(artifact, steps=2)
    one_line(e, MANIFEST, "'io'")


def _raw(artifact: Path) -> dict:
    return json.loads((artifact / MANIFEST).read_text())


def _replace_listed_file(artifact: Path, name: str, data: bytes) -> None:
    """Replace a file and re-list it in the manifest, so checksums are consistent and the
    check under test is the one that has to catch it."""
    (artifact / name).write_bytes(data)
    m = _raw(artifact)
    m["files"][name] = {"size": len(data), "sha256": sha256_file(artifact / name)}
    (artifact / MANIFEST).write_text(json.dumps(m))


def test_graph_onnx_runtime_cannot_load(artifact):
    _replace_listed_file(artifact, MODEL_FILE, b"this is not a protobuf" * 8)
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, MODEL_FILE, "ONNX Runtime cannot load it")


def test_tokenizer_of_another_vocab_size(artifact):
    load_generator(artifact, provider="cpu")  # the intact copy loads
    _replace_listed_file(artifact, "tokenizer.model", preset_tokenizer(1000))
    Manifest.read(artifact).check_files(artifact, hashes=True)  # consistent: only the vocabulary check can catch it
    with pytest.raises(ArtifactError) as e:
        load_generator(artifact, provider="cpu")
    one_line(e, str(artifact), "1000", "512")


def test_replaced_tokenizer_without_manifest_update(artifact):
    (artifact / "tokenizer.model").write_bytes(preset_tokenizer(1000))
    with pytest.raises(ArtifactError) as e:
        load_generator(artifact, provider="cpu")
    one_line(e, "tokenizer.model")


def test_artifact_without_tokenizer_cannot_generate(artifact):
    m = _raw(artifact)
    m["tokenizer"] = None
    del m["files"]["tokenizer.model"]
    (artifact / MANIFEST).write_text(json.dumps(m))
    (artifact / "tokenizer.model").unlink()
    DecoderSession(artifact, provider="cpu")  # still a valid graph
    with pytest.raises(ArtifactError) as e:
        load_generator(artifact, provider="cpu")
    one_line(e, "no tokenizer.model")


# -- reading an artifact is a trust boundary ---------------------------------------------------------


def _elsewhere(artifact: Path) -> Path:
    """A complete, valid artifact's graph and weights outside `artifact`."""
    other = artifact.parent / "elsewhere"
    other.mkdir()
    for name in (MODEL_FILE, _raw(artifact)["data_file"]):
        (other / name).parent.mkdir(exist_ok=True)
        shutil.copy(artifact / name, other / name)
    return other


def _point_at(artifact: Path, field: str, name: str, listed: Path) -> None:
    """Set a path field and list it with its true size and sha256 (a consistent forgery)."""
    m = _raw(artifact)
    m[field] = name
    m["files"][name] = {"size": listed.stat().st_size, "sha256": sha256_file(listed)}
    (artifact / MANIFEST).write_text(json.dumps(m))


def test_model_file_outside_the_artifact_is_refused(artifact):
    other = _elsewhere(artifact)
    _point_at(artifact, "model_file", "../elsewhere/model.onnx", other / MODEL_FILE)
    for load in (lambda: DecoderSession(artifact, provider="cpu"), lambda: load_generator(artifact, provider="cpu"),
                 lambda: verify_dir(artifact, steps=2)):
        with pytest.raises(ArtifactError) as e:
            load()
        one_line(e, "model_file", "'../elsewhere/model.onnx'", "outside the artifact")


def test_absolute_and_symlinked_paths_are_refused(artifact):
    other = _elsewhere(artifact)
    _point_at(artifact, "model_file", str(other / MODEL_FILE), other / MODEL_FILE)
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, "model_file", "not a path inside")
    # A name inside the directory that is a symlink to a graph elsewhere.
    (artifact / "linked.onnx").symlink_to(other / MODEL_FILE)
    _point_at(artifact, "model_file", "linked.onnx", other / MODEL_FILE)
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, "model_file", "outside the artifact")


@pytest.mark.parametrize("field", ["tokenizer", "portable_model_file"])
def test_every_named_path_is_checked(artifact, field):
    m = _raw(artifact)
    m[field] = "../../etc/passwd"
    (artifact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, field, "outside the artifact")


def test_provider_graph_and_listed_files_are_checked(artifact):
    m = _raw(artifact)
    m["provider_model_files"] = {"cpu": "../x.onnx"}
    (artifact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, "provider_model_files['cpu']", "outside")
    m = _raw(artifact) | {"provider_model_files": {}}
    m["files"]["../../x"] = {"size": 1, "sha256": "0" * 64}
    (artifact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        verify_dir(artifact, steps=2)
    one_line(e, "files['../../x']", "outside")


@pytest.mark.parametrize("field,value,needle", [
    ("max_length", "long", "'max_length' must be an integer"),
    ("max_length", True, "'max_length' must be an integer"),
    ("precision", "int3", "'precision' is 'int3', not one of fp32"),
    ("model_file", 7, "'model_file' must be a string"),
    ("files", [], "'files' must be an object"),
    ("kv_cache", "ring", "'kv_cache' is 'ring'"),
])
def test_a_bad_field_is_named(artifact, field, value, needle):
    m = _raw(artifact)
    m[field] = value
    (artifact / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ArtifactError) as e:
        DecoderSession(artifact, provider="cpu")
    one_line(e, MANIFEST, needle)


def test_manifest_round_trips_exactly(artifact):
    """What the typed Manifest writes is what it read, key order included."""
    text = (artifact / MANIFEST).read_text()
    m = Manifest.read(artifact)
    (artifact / MANIFEST).unlink()
    m.write(artifact)
    assert (artifact / MANIFEST).read_text() == text
