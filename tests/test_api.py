"""The Python API at the package's top level (api.py, runtime Generator): typed results,
typed errors, and the same outputs as the CLI, which is a thin layer over it.

The slow half exports tiny-gemma1 twice, once through `gemma_export.export` and once
through `gemma-export export`, with the same arguments; the fast half needs no artifact.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

import gemma_export as ge
from gemma_export.cli import main
from tests.test_cli import run_main

PRESET = "tiny-gemma1"
STEPS = 4
PROMPTS = ["Hello", "The capital of France is", "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich"]


# -- fast: no artifact ------------------------------------------------------------------------------


def test_top_level_names_resolve():
    for name in ge.__all__:
        assert getattr(ge, name) is not None, name
    from gemma_export.runtime import generate

    assert ge.Generator is generate.Generator and ge.SamplingConfig is generate.SamplingConfig
    assert {"Generator", "format_chat"} <= set(dir(ge))
    with pytest.raises(AttributeError):
        ge.no_such_name  # noqa: B018


def test_sampling_keywords_are_sampling_config_fields():
    """Three spellings of one set of names (the TypedDict, the type table, the dataclass)."""
    from gemma_export.runtime.generate import _SAMPLING_TYPES, Sampling, SamplingConfig

    fields = [f.name for f in dataclasses.fields(SamplingConfig)]
    assert list(Sampling.__annotations__) == fields
    assert list(_SAMPLING_TYPES) == fields


def test_sampling_config_from_keywords():
    from gemma_export.runtime.generate import sampling_config

    cfg = sampling_config(max_new_tokens=3, temperature=1, stop="\n", seed=5)
    assert cfg == ge.SamplingConfig(max_new_tokens=3, temperature=1, stop=("\n",), seed=5)
    assert sampling_config(stop=["a", "b"]).stop == ("a", "b")
    for bad, needle in [({"max_new_tokenz": 3}, "unknown sampling option 'max_new_tokenz'"),
                        ({"temperature": "hot"}, "'temperature' must be int or float"),
                        ({"max_new_tokens": True}, "'max_new_tokens' must be int"),
                        ({"stop": [1]}, "'stop' must be a string or a list"),
                        ({"max_new_tokens": 0}, "max-new-tokens"),
                        ({"top_p": 1.5}, "top-p")]:
        with pytest.raises(ge.RuntimeConfigError, match=needle):
            sampling_config(**bad)


def test_bad_input_raises_typed_errors_before_any_work(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ge.UsageError, match="precision 'fp8' is not one of fp32"):
        ge.export(PRESET, out, precision="fp8")
    with pytest.raises(ge.UsageError, match="steps must be an integer >= 1"):
        ge.export(PRESET, out, steps=0)
    with pytest.raises(ge.UsageError, match="--block-size applies to int8 and int4"):
        ge.export(PRESET, out, block_size=64)
    with pytest.raises(ge.CheckpointError, match="tiny-gemma9"):
        ge.export("tiny-gemma9", out)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    with pytest.raises(ge.ExportError, match="--force"):
        ge.export(PRESET, tmp_path / "full")
    with pytest.raises(ge.UsageError, match="quantize makes"):
        ge.quantize(tmp_path, out, precision="fp32")
    with pytest.raises(ge.ArtifactError, match="no such directory"):
        ge.quantize(tmp_path / "nope", out, precision="int8")
    with pytest.raises(ge.ArtifactError, match="not an artifact"):
        ge.verify(tmp_path)
    with pytest.raises(ge.ArtifactError, match="no such directory"):
        ge.load(tmp_path / "nope")
    with pytest.raises(ge.ArtifactError, match="not an artifact"):
        ge.Artifact.open(tmp_path)
    assert not out.exists()


# -- slow: one artifact from the API, one from the CLI, same arguments --------------------------------


@pytest.fixture(scope="module")
def api_artifact(tmp_path_factory) -> ge.Artifact:
    return ge.export(PRESET, tmp_path_factory.mktemp("api") / PRESET, steps=STEPS)


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("api-cli") / PRESET
    rc, out, err = run_main(["export", PRESET, "--out", str(d), "--steps", str(STEPS), "--json"])
    assert rc == 0, err
    return d, json.loads(out)


@pytest.fixture(scope="module")
def gen(api_artifact) -> ge.Generator:
    return ge.load(api_artifact, provider="cpu")


@pytest.mark.slow
def test_export_returns_the_artifact_the_cli_writes(api_artifact, cli_export):
    d, printed = cli_export
    assert isinstance(api_artifact, ge.Artifact) and api_artifact.precision is ge.Precision.FP32
    # the same bytes: every file the manifest lists, by size and sha256
    assert api_artifact.manifest.files == ge.Artifact.open(d).manifest.files
    # the CLI's --json object is the API artifact's result (the run's seconds aside)
    def same(res: dict) -> dict:
        return {**res, "out": None, "seconds": None, "parity": {**res["parity"], "seconds": None}}

    assert same(api_artifact.result(0.0)) == same(printed)
    assert printed["model"] == "preset:tiny-gemma1" and api_artifact.parity.model == "preset:tiny-gemma1"
    # reading it back gives the same typed record
    again = ge.Artifact.open(api_artifact.path)
    assert again.manifest == api_artifact.manifest and again.parity == api_artifact.parity


@pytest.mark.slow
@pytest.mark.parametrize("args,sampling", [
    ([], {}),
    (["--temperature", "1.0", "--top-k", "50", "--seed", "7"], {"temperature": 1.0, "top_k": 50, "seed": 7}),
    (["--chat"], {"chat": True}),
], ids=["greedy", "seeded", "chat"])
def test_generate_equals_the_cli(gen, cli_export, capsys, args, sampling):
    """load -> generate on the API's artifact prints what `gemma-export generate` prints on
    the CLI's artifact, for the same arguments."""
    d, _ = cli_export
    rc = main(["generate", str(d), *PROMPTS, "--max-new-tokens", "12", "--provider", "cpu", "--json", *args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    cli_texts = [r["text"] for r in json.loads(out)["results"]]
    assert gen.generate(PROMPTS, max_new_tokens=12, **sampling) == cli_texts
    assert any(cli_texts)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [
    {"max_new_tokens": 24},
    {"max_new_tokens": 24, "temperature": 1.0, "seed": 11},  # random bytes: the UTF-8 holding-back path
    {"max_new_tokens": 24, "ignore_eos": True, "stop": "z z"},
], ids=["greedy", "seeded", "stop"])
def test_stream_pieces_join_to_the_text(gen, sampling):
    text = gen.generate(PROMPTS[2], **sampling)
    pieces = list(gen.stream(PROMPTS[2], **sampling))
    assert "".join(pieces) == text
    assert len(pieces) > 1 and all(pieces)


@pytest.mark.slow
def test_stream_stops_when_the_reader_leaves(gen, monkeypatch):
    """Closing the iterator ends the worker's decode loop at its next piece, long before
    the context would (the worker is joined on close, so counting forwards after it is exact).
    The worker runs ahead of the reader until then (14 forwards seen on a loaded machine);
    without the stop it decodes to the context: 251 forwards here."""
    forwards = []
    run = gen.session.forward
    monkeypatch.setattr(gen.session, "forward", lambda *a, **k: (forwards.append(1), run(*a, **k))[1])
    pieces = gen.stream(PROMPTS[0], max_new_tokens=10_000, ignore_eos=True)
    assert next(pieces)
    pieces.close()  # what leaving a for loop early does
    assert not [t for t in threading.enumerate() if t.name == "gemma-export-stream"]
    assert gen.session.max_length == 256 and len(forwards) < 100, len(forwards)


@pytest.mark.slow
def test_stream_raises_what_generation_raises(gen):
    long = "a " * (gen.session.max_length + 5)
    it = gen.stream(long, max_new_tokens=4)
    with pytest.raises(ge.RuntimeConfigError, match="does not fit the model's context"):
        next(it)


@pytest.mark.slow
def test_batch_equals_each_prompt_alone(gen):
    batch = gen.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    alone = [gen.generate(p, max_new_tokens=16, ignore_eos=True) for p in PROMPTS]
    assert isinstance(batch, list) and isinstance(alone[0], str)
    assert batch == alone
    assert len(set(batch)) == len(PROMPTS)  # three different continuations, not one repeated


@pytest.mark.slow
def test_chat_is_gemmas_turn_format(gen):
    reply = gen.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8, ignore_eos=True)
    assert reply == gen.generate("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
                                 max_new_tokens=8, ignore_eos=True)
    assert reply == gen.generate("Hi", chat=True, max_new_tokens=8, ignore_eos=True)


@pytest.mark.slow
def test_generator_bad_input(gen, api_artifact):
    with pytest.raises(ge.RuntimeConfigError, match="unknown provider 'bogus'"):
        ge.load(api_artifact, provider="bogus")
    with pytest.raises(ge.RuntimeConfigError, match="--threads must be >= 1"):
        ge.load(api_artifact, threads=0)
    with pytest.raises(ge.RuntimeConfigError, match="max-new-tokens"):
        gen.generate("Hi", max_new_tokens=0)
    with pytest.raises(ge.RuntimeConfigError, match="stream takes one prompt"):
        gen.stream(["a", "b"])
    with pytest.raises(ge.RuntimeConfigError, match="'top_k' must be int"):
        gen.stream("a", top_k=1.5)  # checked at the call, before iteration
    with pytest.raises(ge.RuntimeConfigError, match="no prompts"):
        gen.generate([])
    with pytest.raises(ge.RuntimeConfigError, match="prompt must be a str or a list of str"):
        gen.generate(42)
    with pytest.raises(ge.RuntimeConfigError, match="no messages"):
        gen.chat([])


# -- verify -------------------------------------------------------------------------------------------


@pytest.fixture
def copy(api_artifact, tmp_path) -> Path:
    return Path(shutil.copytree(api_artifact.path, tmp_path / "art"))


@pytest.mark.slow
def test_verify_returns_the_report_of_the_real_comparison(copy):
    import torch

    from gemma_export.exporter.verify import make_prompts
    from gemma_export.models.load import load_model
    from gemma_export.runtime.session import DecoderSession

    report = ge.verify(copy, steps=2)
    assert isinstance(report, ge.ParityReport) and report.passed
    assert (report.precision, report.steps, report.model) == ("fp32", 2, "preset:tiny-gemma1")
    assert report.prompts == [5, 11, 19]  # verify's seeded prompts for a preset
    assert json.loads((copy / "parity.json").read_text()) == report.to_dict()
    assert ge.Artifact.open(copy).parity == report
    # The reported max abs diff is the largest over every prompt and step, so it is at
    # least what an independent prefill of the first prompt measures, and within fp32's bound.
    worst = report.metric("logits max abs diff")
    assert worst.passed and worst.threshold == 1e-3 and worst.op == "<="
    sess = DecoderSession(copy, provider="cpu")
    prompt = make_prompts(sess.vocab_size)[0]
    ids = np.array([prompt], np.int64)
    got, _ = sess.forward(ids, np.ones_like(ids), np.arange(len(prompt))[None], sess.new_cache(1))
    model = load_model(PRESET).model
    with torch.no_grad():
        t = torch.tensor(ids)
        ref, _ = model(t, torch.ones_like(t), torch.arange(len(prompt))[None], model.empty_cache(1))
    mine = float(np.abs(got.astype(np.float64) - ref.numpy().astype(np.float64)).max())
    assert 0 < mine <= worst.measured <= 1e-3
    assert report.metric("greedy top-1 agreement").measured == 1.0


@pytest.mark.slow
def test_verify_miss_raises_parity_error_carrying_the_report(copy, monkeypatch):
    """Another seed's weights: same config, different model, so parity fails honestly."""
    from gemma_export.models import load

    orig = load.random_weights
    monkeypatch.setattr(load, "random_weights", lambda cfg, seed=0: orig(cfg, seed + 1))
    with pytest.raises(ge.ParityError, match="parity FAILED for fp32") as caught:
        ge.verify(ge.Artifact.open(copy), steps=2)
    e = caught.value
    assert e.exit_code == 3 and isinstance(e.report, ge.ParityReport) and not e.report.passed
    assert not e.report.metric("logits max abs diff").passed
    assert e.artifact.path == copy and e.artifact.parity == e.report
    assert ge.Artifact.open(copy).parity == e.report  # written to parity.json all the same
