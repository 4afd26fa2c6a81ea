"""GPTQ and its calibration: the rounding against round-to-nearest on inputs it was told
about, and the second moments collected a token at a time against a whole-sequence run."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from gemma_export.errors import CheckpointError
from gemma_export.exporter.calibrate import empty_past, fp32_session, sample_with_moments
from gemma_export.exporter.pipeline import quantize_artifact
from gemma_export.exporter.quantize import EMBED, dequantized_weights, gptq_blocks, product_inputs, quantize_blocks


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
    h[5, 5] = 0.0
    assert np.isfinite(gptq_blocks(w, h, 4, 32, False).dequantize()).all()


def test_moments_a_token_at_a_time_equal_a_whole_sequence_run(tiny_artifacts):
    src = tiny_artifacts["tiny-gemma3"][0]
    path = src / "model.onnx"
    proto = onnx.load(str(path), load_external_data=False)
    names = product_inputs(proto)
    presents = [o.name for o in proto.graph.output if o.name.startswith("present")]
    layers = json.loads((src / "manifest.json").read_text())["config"]["num_hidden_layers"]
    assert len(names) == 4 * layers  # per layer: q/k/v share one input, then o's, gate/up's, down's
    ids, moments = sample_with_moments(path, presents, names, bos_id=2, sequences=3, length=20, seed=5)
    assert ids.shape == (3, 20) and (ids[:, 0] == 2).all()
    again, _ = sample_with_moments(path, presents, names, bos_id=2, sequences=3, length=20, seed=5)
    np.testing.assert_array_equal(ids, again)  # seeded
    assert len({tuple(r) for r in ids.tolist()}) == 3  # sampled, not greedy copies

    sess = fp32_session(path, names)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.broadcast_to(np.arange(20), ids.shape).copy(), **empty_past(sess, 3)}
    for name, x in zip(names, sess.run(names, feeds)):
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        np.testing.assert_allclose(moments[name], x.T @ x, rtol=1e-4, atol=1e-4 * np.abs(x.T @ x).max())


def test_int4_defaults_to_gptq_and_rtn_is_selectable(tiny_artifacts, tmp_path):
    src = tiny_artifacts["tiny-gemma2"][0]
    quantize_artifact(src, tmp_path / "g", precision="int4", verify=False)
    quantize_artifact(src, tmp_path / "r", precision="int4", gptq=False, verify=False)
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
    with pytest.raises(CheckpointError):
        quantize_artifact(src, tmp_path / "x", precision=precision, gptq=True)
    assert not (tmp_path / "x").exists()
