"""The `gemma-export` command: `cli.main(argv)` in process (exit code returned, output
through capsys), and the installed console script in a subprocess for what only a real
process shows (stdin, the debug variable, the console entry point itself).

The contract under test (cli.py's docstring): stdout carries the result only, --json
prints exactly one JSON object; a user mistake prints one `Error: ...` line on stderr,
no traceback, and exits non-zero (usage 2, failure 1, parity miss 3).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_export import __version__
from gemma_export.cli import main
from gemma_export.errors import ArtifactError
from gemma_export.runtime.session import cuda_available

PRESET = "tiny-gemma1"
STEPS = "4"  # verify steps: enough to compare decoding, cheap on 2 cores
SCRIPT = Path(sys.executable).parent / "gemma-export"


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured (usable outside a test's capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def run_script(args: list[str], *, input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    if not SCRIPT.is_file():
        pytest.skip(f"console script not installed at {SCRIPT}")
    base = {k: v for k, v in os.environ.items() if k != "GEMMA_EXPORT_DEBUG"}
    return subprocess.run(
        [str(SCRIPT), *args], input=input, env=base | (env or {}), capture_output=True, text=True, timeout=120,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def error_line(rc: int, out: str, err: str, code: int, *needles: str, only: bool = True) -> str:
    """Exit `code`, nothing on stdout, exactly one `Error: ...` line (the last) on stderr and
    no traceback. `only`: that line is all of stderr (usage errors add Click's usage hint)."""
    assert rc == code, f"exit {rc}, expected {code}; stderr: {err!r}"
    assert out == "", f"stdout not empty: {out!r}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"stderr: {err!r}"
    if only:
        assert lines == errors, f"stderr has more than the error: {err!r}"
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`gemma-export export tiny-gemma1 --out DIR --json` once: (dir, rc, stdout, stderr)."""
    d = tmp_path_factory.mktemp("cli") / PRESET
    rc, out, err = run_main(["export", PRESET, "--out", str(d), "--json", "--steps", STEPS])
    return d, rc, out, err


@pytest.fixture
def artifact(exported) -> Path:
    d, rc, _, err = exported
    assert rc == 0, err
    return d


# -- help and version -------------------------------------------------------------------------------


@pytest.mark.parametrize("cmd", [[], ["export"], ["verify"], ["generate"], ["inspect"]],
                         ids=["app", "export", "verify", "generate", "inspect"])
def test_help(capsys, cmd):
    assert main([*cmd, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Usage: gemma-export") and err == ""
    if cmd:
        assert "--json" in out
    else:
        assert all(c in out for c in ("export", "verify", "generate"))


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gemma-export {__version__}\n"


def test_no_arguments_shows_help(capsys):
    rc = main([])
    out, err = capsys.readouterr()
    assert rc == 2 and "Usage: gemma-export" in out + err and "Traceback" not in err


# -- export -------------------------------------------------------------------------------------------


def test_export_json_prints_one_object(exported):
    d, rc, out, err = exported
    assert rc == 0, err
    assert out.endswith("\n") and out.count("\n") == 1, f"more than one line on stdout: {out!r}"
    res = json.loads(out)
    assert res["out"] == str(d) and res["precision"] == "fp32"
    assert res["parity"]["passed"] is True
    assert res["parity"]["steps"] == int(STEPS)
    assert err == "", f"--json must turn progress off: {err!r}"
    assert (d / "manifest.json").is_file()


@pytest.mark.slow
def test_export_text_prints_parity_table_via_console_script(tmp_path):
    """The one run through the installed console script end to end."""
    d = tmp_path / "art"
    p = run_script(["export", "tiny-gemma2", "--out", str(d), "--steps", STEPS])
    assert p.returncode == 0, p.stderr
    assert "metric" in p.stdout and "threshold" in p.stdout and "parity PASS" in p.stdout
    assert p.stdout.strip().splitlines()[-1].startswith(f"wrote {d}")
    assert "tracing to ONNX" in p.stderr  # progress goes to stderr, never stdout
    assert "tracing" not in p.stdout


def test_verify_text_and_json(artifact, capsys):
    assert main(["verify", str(artifact), "--steps", "2"]) == 0
    out, _ = capsys.readouterr()
    assert "parity PASS" in out
    assert main(["verify", str(artifact), "--steps", "2", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["parity"]["passed"] is True and err == ""


def test_parity_failure_exits_3_and_still_prints_the_table(artifact, tmp_path, monkeypatch, capsys):
    """Verify against weights from another seed: same config, different model, so parity
    must fail honestly (no threshold touched)."""
    from gemma_export.models import load

    copy = Path(shutil.copytree(artifact, tmp_path / "art"))
    orig = load.random_weights
    monkeypatch.setattr(load, "random_weights", lambda cfg, seed=0: orig(cfg, seed + 1))
    rc = main(["verify", str(copy), "--steps", "2"])
    out, err = capsys.readouterr()
    assert rc == 3, err
    assert "metric" in out and "parity FAIL" in out  # the table is the result, even on a miss
    row = next(ln for ln in out.splitlines() if ln.startswith("logits max abs diff"))
    assert row.endswith("NO"), row
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and "parity FAILED" in lines[0] and "Traceback" not in err
    assert json.loads((copy / "parity.json").read_text())["passed"] is False

    # --json: stdout is still the one JSON object a machine reads, not the text table
    rc = main(["verify", str(copy), "--steps", "2", "--json"])
    out, err = capsys.readouterr()
    assert rc == 3, err
    res = json.loads(out)
    assert res["parity"]["passed"] is False and res["artifact"] == str(copy)
    assert [ln for ln in err.splitlines() if ln.startswith("Error:")] == lines


# -- user mistakes -------------------------------------------------------------------------------------


def test_unknown_preset(tmp_path, capsys):
    rc = main(["export", "tiny-gemma9", "--out", str(tmp_path / "o"), "--json"])
    error_line(rc, *capsys.readouterr(), 1, "tiny-gemma9", "tiny-gemma1", "tiny-gemma3")
    assert not (tmp_path / "o").exists()


def test_bad_precision_is_a_usage_error(tmp_path, capsys):
    rc = main(["export", PRESET, "--out", str(tmp_path / "o"), "--precision", "fp8"])
    error_line(rc, *capsys.readouterr(), 2, "--precision", "fp8", only=False)


def test_missing_out_is_a_usage_error(capsys):
    rc = main(["export", PRESET])
    error_line(rc, *capsys.readouterr(), 2, "--out", only=False)


def test_unknown_command_is_a_usage_error(capsys):
    rc = main(["exprot"])
    error_line(rc, *capsys.readouterr(), 2, "exprot", only=False)


def test_non_empty_out(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "f").write_text("x")
    rc = main(["export", PRESET, "--out", str(tmp_path / "o"), "--json"])
    error_line(rc, *capsys.readouterr(), 1, "--force")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["f"]


def test_verify_non_artifact(tmp_path, capsys):
    rc = main(["verify", str(tmp_path), "--json"])
    error_line(rc, *capsys.readouterr(), 1, str(tmp_path), "manifest.json")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--top-p", "0"], "--top-p"),
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "-1"], "--top-k"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--threads", "0"], "--threads"),
    ],
    ids=["negative-max-new-tokens", "zero-max-new-tokens", "top-p-0", "negative-temperature", "negative-top-k",
         "repetition-penalty-0", "threads-0"],
)
def test_generate_bad_sampling_option(artifact, capsys, args, needle):
    rc = main(["generate", str(artifact), "Hello", *args])
    error_line(rc, *capsys.readouterr(), 1, needle)


def test_generate_missing_dir(tmp_path, capsys):
    rc = main(["generate", str(tmp_path / "nope"), "Hello"])
    error_line(rc, *capsys.readouterr(), 1, "nope", "no such directory")


@pytest.mark.skipif(cuda_available(), reason="this onnxruntime has the CUDA provider")
def test_generate_provider_cuda_without_cuda(artifact, capsys):
    rc = main(["generate", str(artifact), "Hello", "--provider", "cuda"])
    error_line(rc, *capsys.readouterr(), 1, "--provider cuda")


def test_generate_unknown_provider(artifact, capsys):
    rc = main(["generate", str(artifact), "Hello", "--provider", "bogus"])
    # A bad choice is a usage error, like --precision.
    error_line(rc, *capsys.readouterr(), 2, "bogus", "auto, cpu, cuda", only=False)


def test_generate_prompt_file_and_argument(artifact, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("a\n")
    rc = main(["generate", str(artifact), "Hello", "--prompt-file", str(f)])
    error_line(rc, *capsys.readouterr(), 2, "--prompt-file", only=False)


# -- generate ---------------------------------------------------------------------------------------------


def test_generate_json(artifact, capsys):
    rc = main(["generate", str(artifact), "Hello", "--max-new-tokens", "5", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.count("\n") == 1 and err == ""
    res = json.loads(out)
    assert res["provider"] in ("cpu", "cuda")
    [r] = res["results"]
    assert r["prompt"] == "Hello" and r["prompt_tokens"] >= 2  # <bos> + the text
    assert 0 <= r["new_tokens"] <= 5
    assert r["finish_reason"] in ("eos", "length", "stop")


def test_generate_streams_text(artifact, capsys):
    rc = main(["generate", str(artifact), "Hello", "--max-new-tokens", "5", "--provider", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.endswith("\n")
    assert err.startswith("provider: cpu\n") and "tokens, first after" in err


def _short_context(artifact: Path, tmp_path: Path, n: int) -> Path:
    """A copy of the artifact whose manifest says its context is n tokens."""
    d = tmp_path / "short"
    shutil.copytree(artifact, d)
    m = json.loads((d / "manifest.json").read_text())
    m["max_length"] = n
    (d / "manifest.json").write_text(json.dumps(m))
    return d


def test_generate_refuses_a_prompt_longer_than_the_context_unless_truncating(artifact, tmp_path, capsys):
    d = _short_context(artifact, tmp_path, 16)
    prompt = " ".join(["word"] * 40)
    rc = main(["generate", str(d), prompt, "--max-new-tokens", "4"])
    out, err = capsys.readouterr()
    error_line(rc, out, err, 1, "does not fit the model's context of 16 tokens", "--truncate", only=False)
    assert out == ""
    rc = main(["generate", str(d), prompt, "--max-new-tokens", "4", "--truncate", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    [r] = json.loads(out)["results"]
    assert r["prompt_tokens"] == 12 and r["new_tokens"] <= 4  # room kept for the 4 new tokens
    rc = main(["generate", str(d), prompt, "--max-new-tokens", "100", "--truncate", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    [r] = json.loads(out)["results"]
    # half the context stays prompt; the row then ends at the context, not at max-new-tokens
    # (the last token sampled needs no cache slot: 16 positions fed, 17 tokens in all)
    assert r["prompt_tokens"] == 8 and r["prompt_tokens"] + r["new_tokens"] <= 16 + 1
    assert r["finish_reason"] in ("context", "eos")


def test_generate_batch_from_prompt_file(artifact, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("Hello\n\nThe capital of France is\n")  # blank lines are skipped
    rc = main(["generate", str(artifact), "--prompt-file", str(f), "--max-new-tokens", "4", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)["results"]
    assert [r["prompt"] for r in res] == ["Hello", "The capital of France is"]
    assert all(r["new_tokens"] <= 4 for r in res)


def test_generate_is_reproducible_with_a_seed(artifact, capsys):
    args = ["generate", str(artifact), "Hello", "--max-new-tokens", "6", "--temperature", "1.5", "--seed", "7",
            "--json"]
    texts = []
    for _ in range(2):
        assert main(args) == 0
        texts.append(json.loads(capsys.readouterr().out)["results"][0]["text"])
    assert texts[0] == texts[1]


def test_generate_prompt_from_stdin(artifact):
    p = run_script(["generate", str(artifact), "--max-new-tokens", "3", "--json"], input="Hello from stdin")
    assert p.returncode == 0, p.stderr
    [r] = json.loads(p.stdout)["results"]
    assert r["prompt"] == "Hello from stdin" and r["new_tokens"] <= 3
    p = run_script(["generate", str(artifact), "-", "--max-new-tokens", "3", "--json"], input="Hi")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["results"][0]["prompt"] == "Hi"


def test_console_script_user_error_and_debug_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    p = run_script(["generate", missing, "Hello"])
    error_line(p.returncode, p.stdout, p.stderr, 1, "no such directory")
    p = run_script(["generate", missing, "Hello"], env={"GEMMA_EXPORT_DEBUG": "1"})
    assert p.returncode != 0
    assert "Traceback (most recent call last)" in p.stderr and "ArtifactError" in p.stderr


def test_debug_variable_reraises_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_EXPORT_DEBUG", "1")
    with pytest.raises(ArtifactError):
        main(["verify", str(tmp_path)])


def test_portable_graph_of_an_integer_artifact(artifact, tmp_path, capsys):
    """int8 artifacts carry the contract-exact graph beside the fused one; --portable runs
    it (bench reports which graph ran); an fp32 artifact's model.onnx is that graph already."""
    q = tmp_path / "int8"
    rc, _, err = run_main(["quantize", str(artifact), "--precision", "int8", "--out", str(q), "--no-verify", "--json"])
    assert rc == 0, err
    for extra, graph in (([], "model.onnx"), (["--portable"], "model.portable.onnx")):
        rc = main(["bench", str(q), "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--json", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert json.loads(out)["graph"] == graph
    rc = main(["generate", str(q), "Hello", "--portable", "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["results"][0]["new_tokens"] <= 3, err
    rc = main(["bench", str(artifact), "--prompt-tokens", "8", "--new-tokens", "2", "--repeats", "1", "--json",
               "--portable"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["graph"] == "model.onnx", err


# -- inspect and flags misused with a precision ---------------------------------------------------


def test_inspect_text_and_json(artifact, tmp_path, capsys):
    q = tmp_path / "int8"
    rc, _, err = run_main(["quantize", str(artifact), "--precision", "int8", "--out", str(q), "--no-verify", "--json"])
    assert rc == 0, err
    raw = json.loads((q / "manifest.json").read_text())
    assert main(["inspect", str(q), "--json"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)  # one object, nothing else on stdout
    assert info["precision"] == "int8" and info["kv_cache"] == "shared"
    assert info["size_bytes"] == sum(f["size"] for f in raw["files"].values())
    assert info["graphs"]["model.portable.onnx"][0] == "cuda provider"
    assert set(info["io"]["inputs"]) == set(raw["io"]["inputs"])
    assert info["parity"] is None and info["opens_in"]["any ONNX runtime"] is False
    assert all(info["opens_in"][c] for c in ("onnxruntime-genai", "optimum", "transformers.js"))
    assert info["clients"]["transformers.js"] == {"graph": "onnx/model_quantized.onnx",
                                                  "data": "onnx/model_quantized.onnx_data", "dtype": "q8"}
    # genai drives the fused graph (its shared-buffer mode is our shared cache), the others the portable one.
    assert info["clients"]["onnxruntime-genai"]["graph"] == "model.onnx"
    genai = json.loads((q / "genai_config.json").read_text())
    assert genai["search"]["past_present_share_buffer"] is True
    # One weights file, in transformers.js's folder, read by every graph.
    assert raw["data_file"] == "onnx/model_quantized.onnx_data" and not (q / "model.onnx.data").exists()
    assert main(["inspect", str(artifact)]) == 0
    out, _ = capsys.readouterr()
    assert "precision   fp32" in out and "parity      passed" in out and "past_key_values.{0..1}.key" in out
    assert "onnxruntime-genai  genai_config.json -> model.onnx" in out
    assert "transformers.js    onnx/model.onnx (dtype fp32)" in out


def test_inspect_non_artifact(tmp_path, capsys):
    rc = main(["inspect", str(tmp_path)])
    error_line(rc, *capsys.readouterr(), 1, "not an artifact")


@pytest.mark.parametrize("args,needle", [
    (["export", PRESET, "--precision", "fp32", "--block-size", "64"], "--block-size applies to int8 and int4"),
    (["export", PRESET, "--precision", "fp16", "--rtn"], "--rtn applies to int8 and int4"),
    (["export", "--precision", "gguf", "--block-size", "64"], "come from the GGUF file"),
    (["export", PRESET, "--precision", "int8", "--accuracy-level", "7"], "must be 0..4"),
], ids=["fp32-block", "fp16-rtn", "gguf-block", "accuracy"])
def test_flag_misused_with_a_precision_is_a_usage_error(tmp_path, capsys, args, needle):
    rc = main([*args, "--out", str(tmp_path / "o")])
    error_line(rc, *capsys.readouterr(), 2, needle)
    assert not (tmp_path / "o").exists()
