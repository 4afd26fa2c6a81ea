"""`gemma-export serve` argument handling: mistakes fail fast, in one line, before a port
is taken or a model loaded."""

from __future__ import annotations

import pytest

from tests.test_cli import run_main


def test_help_lists_the_options():
    rc, out, _ = run_main(["serve", "--help"])
    assert rc == 0
    for opt in ("--host", "--port", "--provider", "--threads", "--max-batch", "--max-queue", "--api-key",
                "GEMMA_EXPORT_API_KEY", "--served-model-name", "--cors-origin", "--no-verify-checksums",
                "--log-prompts", "--grace"):
        assert opt in out


def test_not_an_artifact_is_one_line_exit_1(tmp_path):
    rc, out, err = run_main(["serve", str(tmp_path / "missing")])
    assert rc == 1 and out == ""
    assert err.startswith("Error: ") and "no such directory" in err and "Traceback" not in err


@pytest.mark.parametrize("args,hint", [(["--max-batch", "0"], "--max-batch"), (["--port", "-1"], "--port"),
                                       (["--provider", "tpu"], "--provider"), (["--api-key", " "], "--api-key")])
def test_bad_options_are_usage_errors(tmp_path, args, hint):
    rc, _, err = run_main(["serve", str(tmp_path), *args])
    assert rc == 2 and hint in err


def test_checksums_are_checked_at_load_unless_skipped(tiny_fp32, tmp_path):
    """A modified weights file of consistent size: refused at load by default (sha256),
    loaded with verify_checksums off (--no-verify-checksums)."""
    import shutil

    from gemma_export.errors import ArtifactError
    from gemma_export.runtime.manifest import Manifest
    from gemma_export.server.main import ServeOptions, loader

    art = tmp_path / "a"
    shutil.copytree(tiny_fp32, art)
    data = art / Manifest.read(art).data_file
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="sha256"):
        loader(art, ServeOptions(provider="cpu"))()
    engine = loader(art, ServeOptions(provider="cpu", verify_checksums=False))()
    assert engine.session.dir == art
