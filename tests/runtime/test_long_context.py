"""Long prompts on the tiny presets (sliding windows of 8, contexts of 256): chunked
prefill and the cache, far past the window, against transformers and against one
unchunked forward; on the portable graph (past/present concat) and on the fused graph
(GroupQueryAttention on one shared buffer per tensor)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from gemma_export.runtime.generate import decode_one_token, forward_chunked, prefill
from gemma_export.runtime.session import DecoderSession
from tests.conftest import TINY
from tests.exporter.test_optimize import _with_graph
from tests.models.test_gemma_vs_transformers import TOL, hf_twin

LENS = [250, 171, 40]  # a ragged batch, left-padded; 250 + NEW fits the context of 256
NEW = 5
CHUNK = 7  # prime: chunks fall at every offset of the window of 8


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    """{preset: {"portable": dir, "fused": dir}}: each tiny preset exported in fp32 without
    verify, and the same weights with every attention fused onto a shared cache (fp32, so
    transformers stays a tight oracle)."""
    from gemma_export.exporter.optimize import optimize_graph
    from gemma_export.exporter.pipeline import export_artifact
    from gemma_export.models.config import GemmaConfig

    root = tmp_path_factory.mktemp("longctx")
    out = {}
    for name in TINY:
        plain = root / name
        export_artifact(name, plain, verify=False)
        cfg = GemmaConfig.from_dict(json.loads((plain / "manifest.json").read_text())["config"])
        proto = onnx.load(str(plain / "model.onnx"), load_external_data=False)
        assert optimize_graph(proto, cfg=cfg).shared_cache
        _with_graph(plain, root / f"{name}-fused", proto)
        out[name] = {"portable": plain, "fused": root / f"{name}-fused"}
    return out


def _batch(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [[2] + rng.integers(4, vocab, n - 1).tolist() for n in LENS]
    W = max(LENS)
    ids = np.zeros((len(LENS), W), np.int64)
    mask = np.zeros((len(LENS), W), np.int64)
    for b, p in enumerate(prompts):
        ids[b, W - len(p):] = p
        mask[b, W - len(p):] = 1
    return prompts, ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None)


def _hf_logits(hf, ids, mask):
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(pos)).logits.numpy()


def _hf_greedy(hf, ids, mask, steps):
    """transformers' greedy continuation of the left-padded batch, one full forward per token."""
    out = []
    for _ in range(steps):
        nxt = _hf_logits(hf, ids, mask)[:, -1].argmax(-1)
        out.append(nxt)
        ids = np.concatenate([ids, nxt[:, None]], 1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), np.int64)], 1)
    return np.stack(out, 1)


def _greedy(sess, prompts, chunk, steps):
    state = prefill(sess, prompts, capacity=max(LENS) + steps, chunk=chunk)
    out = []
    for _ in range(steps):
        tok = state.logits.argmax(-1)
        out.append(tok)
        state = decode_one_token(sess, state, tok)
    return np.stack(out, 1)


@pytest.mark.parametrize("graph", ["portable", "fused"])
@pytest.mark.parametrize("name", TINY)
def test_chunked_prefill_matches_one_forward_and_transformers(graphs, name, graph):
    from gemma_export.models.load import load_model

    sess = DecoderSession(graphs[name][graph], provider="cpu")
    assert sess.shared_cache == (graph == "fused")
    hf = hf_twin(load_model(name).model)  # the preset's seed, as the export
    prompts, ids, mask, pos = _batch(sess.vocab_size)
    real = mask.astype(bool)
    ref = _hf_logits(hf, ids, mask)
    whole, _ = sess.forward(ids, mask, pos, sess.new_cache(len(LENS)))
    chunked, cache = forward_chunked(sess, ids, mask, pos, sess.new_cache(len(LENS)), chunk=CHUNK)
    assert cache.length == max(LENS)
    assert np.abs(whole - ref)[real].max() <= TOL
    d = np.abs(chunked - ref)[real]
    assert d.max() <= TOL, f"max abs diff {d.max():.3g} (mean {d.mean():.3g})"
    assert np.abs(chunked - whole)[real].max() <= TOL
    # greedy tokens after the prompt: chunked == one forward == transformers
    want = _hf_greedy(hf, ids, mask, NEW)
    np.testing.assert_array_equal(_greedy(sess, prompts, CHUNK, NEW), want)
    np.testing.assert_array_equal(_greedy(sess, prompts, 10_000, NEW), want)


def test_chunked_prefill_last_only_and_bad_chunk(graphs):
    from gemma_export.errors import RuntimeConfigError

    sess = DecoderSession(graphs["tiny-gemma3"]["portable"], provider="cpu")
    _, ids, mask, pos = _batch(sess.vocab_size, seed=1)
    full, _ = forward_chunked(sess, ids, mask, pos, sess.new_cache(3), chunk=CHUNK)
    last, _ = forward_chunked(sess, ids, mask, pos, sess.new_cache(3), chunk=CHUNK, last_only=True)
    assert last.shape == (3, 1, sess.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=0, atol=1e-5)
    with pytest.raises(RuntimeConfigError, match="chunk"):
        forward_chunked(sess, ids, mask, pos, sess.new_cache(3), chunk=0)

