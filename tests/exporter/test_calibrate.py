"""GPTQ and its calibration: the rounding against round-to-nearest on inputs it was told
about, and the second moments collected a token at a time against a whole-sequence run."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from gemma_export.errors import UsageError
from gemma_export.exporter.calibrate import InputMoments, empty_past, fp32_session, run_fed, sample_tokens
from gemma_export.exporter.recipes import RecipeOptions
from gemma_export.exporter.pipeline import quantize_artifact
from gemma_export.exporter.blocks import gptq_blocks, quantize_blocks
from gemma_export.contract import EMBED_WEIGHT as EMBED
from gemma_export.exporter.quantize import dequantized_weights, product_inputs


def _correlated_inputs(k: int, rows: int = 4096, seed: int = 0) -> np.ndarray:
    """Rows (drawn with `seed`) of one fixed distribution with correlated channels of very
    different scales, as activations have."""
    fixed = np.random.default_rng(0)
    mix = np.eye(k) + 0.1 * fixed.standard_normal((k, k))
    scale = np.exp(fixed.standard_normal(k))
    return np.random.default_rng(seed).standard_normal((rows, k)) @ mix * scale


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_round_to_nearest_on_its_inputs(bits, symmetric):
    rng = np.random.default_rng(1)
    w = (0.05 * rng.standard_normal((96, 256))).astype(np.float32)
    x = _correlated_inputs(256, seed=1)
    x_new = _correlated_inputs(256, seed=2)  # same distribution, unseen rows
    g = gptq_blocks(w, x.T @ x, bits, 32, symmetric)
    r = quantize_blocks(w, bits, 32, symmetric)
    assert g.codes.shape == r.codes.shape and g.codes.max() < 2**bits
    for inputs in (x, x_new):
        err_g = np.linalg.norm(inputs @ (w - g.dequantize()).T)
        err_r = np.linalg.norm(inputs @ (w - r.dequantize()).T)
        assert err_g < 0.9 * err_r


def test_gptq_is_round_to_nearest_for_white_inputs():
    """With H = c I no column's error can be compensated by another: GPTQ must reduce to RTN,
    and an input channel that never fires (zero row/column of H) must not break it."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 128)).astype(np.float32)
    h = np.eye(128) * 50.0
    for sym in (True, False):
        g, r = gptq_blocks(w, h, 4, 32, sym), quantize_blocks(w, 4, 32, sym)
        np.testing.assert_array_equal(g.codes, r.codes)
        np.testing.assert_array_equal(g.scales, r.scales)
    h[5, 5] = 0.0  # a dead input channel: still nothing to compensate with
    np.testing.assert_array_equal(gptq_blocks(w, h, 4, 32, False).codes, quantize_blocks(w, 4, 32, False).codes)


def test_calibration_text_is_sampled_and_seeded(tiny_artifacts):
    path = tiny_artifacts["tiny-gemma3"][0] / "model.onnx"
    ids = sample_tokens(path, bos_id=2, sequences=3, length=20, seed=5)
    assert ids.shape == (3, 20) and ids.dtype == np.int64 and (ids[:, 0] == 2).all()
    np.testing.assert_array_equal(ids, sample_tokens(path, bos_id=2, sequences=3, length=20, seed=5))
    assert len({tuple(r) for r in ids.tolist()}) == 3  # sampled, not greedy copies
    assert not np.array_equal(ids, sample_tokens(path, bos_id=2, sequences=3, length=20, seed=6))


def test_calibration_runs_feed_num_logits_to_keep(tiny_artifacts):
    """num_logits_to_keep has a default, so ONNX Runtime lists it among the overridable
    initializers, not get_inputs(); a feed filtered by get_inputs() alone dropped it and ran
    the LM head over every calibration position (1.1 GB more per GPTQ batch on the 270M)."""
    src = tiny_artifacts["tiny-gemma3"][0] / "model.onnx"
    sess = fp32_session(src)
    ids = np.random.default_rng(0).integers(3, 200, (2, 9))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(9), ids.shape).copy(), **empty_past(sess, 2)}
    full = run_fed(sess, ["logits"], feeds)[0]
    last = run_fed(sess, ["logits"], feeds | {"num_logits_to_keep": np.array(1, np.int64)})[0]
    assert full.shape[:2] == (2, 9) and last.shape[:2] == (2, 1)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_moments_of_whole_sequences_equal_a_token_at_a_time_run(tiny_artifacts):
    """InputMoments runs whole sequences in batches; the same tensors fetched while decoding
    one token at a time through the KV cache (another path through the graph) must give
    the same sum x x^T."""
    src = tiny_artifacts["tiny-gemma3"][0]
    path = src / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    groups = product_inputs(proto)
    layers = json.loads((src / "manifest.json").read_text())["config"]["num_hidden_layers"]
    assert len(groups) == 4 * layers  # per layer: q/k/v share one input, then o's, gate/up's, down's
    assert sorted(set(groups.values()), key=int) == [str(i) for i in range(layers)]
    ids = sample_tokens(path, bos_id=2, sequences=3, length=12, seed=1)

    names = list(groups)
    sess = fp32_session(path, names)
    presents = [o.name for o in sess.get_outputs() if o.name.startswith("present.")]
    past, want = empty_past(sess, 3), {n: 0.0 for n in names}
    for t in range(ids.shape[1]):
        feeds = {"input_ids": ids[:, t:t + 1], "attention_mask": np.ones((3, t + 1), np.int64),
                 "position_ids": np.full((3, 1), t, np.int64), **past}
        out = dict(zip(presents + names, sess.run(presents + names, feeds)))
        past = {"past_key_values." + p[len("present."):]: out[p] for p in presents}
        for n in names:
            x = out[n].reshape(-1, out[n].shape[-1]).astype(np.float64)
            want[n] = want[n] + x.T @ x

    for batch in (1, 2):
        m = InputMoments(path, ids, groups, batch=batch)
        for n in names:
            got = m.get(n)
            np.testing.assert_allclose(got, want[n], rtol=1e-4, atol=1e-4 * np.abs(want[n]).max())
        assert m.get("not a product input") is None and "not a product input" not in m


def test_int4_defaults_to_gptq_and_rtn_is_selectable(tiny_artifacts, tmp_path):
    src = tiny_artifacts["tiny-gemma2"][0]
    quantize_artifact(src, tmp_path / "g", precision="int4", verify=False)
    quantize_artifact(src, tmp_path / "r", precision="int4", verify=False, options=RecipeOptions(gptq=False))
    mg = json.loads((tmp_path / "g" / "manifest.json").read_text())
    mr = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert mg["recipe"]["gptq"] is True and mg["recipe"]["gptq_sequences"] > 0
    assert mg["quantized"]["gptq"] == mg["quantized"]["matmuls"] > 0
    assert mr["recipe"]["gptq"] is False and mr["quantized"]["gptq"] == 0
    # the products differ; the tied embedding (always round to nearest) does not
    wg, wr = (dequantized_weights(onnx.load(str(tmp_path / d / "model.onnx"))) for d in ("g", "r"))
    np.testing.assert_array_equal(wg[EMBED], wr[EMBED])
    assert not np.array_equal(wg["model.layers.0.mlp.down_proj.weight"], wr["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("precision", ["gguf", "fp16"])
def test_gptq_flag_refused_where_it_means_nothing(tiny_artifacts, tmp_path, precision):
    src = tiny_artifacts["tiny-gemma1"][0]
    with pytest.raises(UsageError, match="GGUF file" if precision == "gguf" else "--rtn applies to int8 and int4"):
        quantize_artifact(src, tmp_path / "x", precision=precision, options=RecipeOptions(gptq=False))
    assert not (tmp_path / "x").exists()


def test_moments_held_within_the_budget(tiny_artifacts):
    """A budget for one layer holds one layer; a large one holds them all after one run;
    either way the matrices are the same."""
    src = tiny_artifacts["tiny-gemma1"][0]
    path = src / "model.onnx"
    groups = product_inputs(onnx.load(str(path), load_external_data=False))
    ids = sample_tokens(path, bos_id=2, sequences=2, length=8, seed=3)
    small, large = InputMoments(path, ids, groups, budget=1), InputMoments(path, ids, groups)
    for n in groups:
        np.testing.assert_allclose(small.get(n), large.get(n), rtol=1e-6)
        assert set(small.held) == {x for x, g in groups.items() if g == groups[n]}
        assert set(large.held) == set(groups)
