"""Long prompts on the tiny presets (sliding windows of 8, contexts of 256): chunked
prefill and the bounded sliding-window cache, far past the window, against transformers
and against one unchunked forward; on the portable graph (past/present concat) with every
position kept ("full") and with sliding layers' entries bounded ("bounded", the CPU
default), and on the fused graph (GroupQueryAttention on one shared buffer per tensor,
always full)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from gemma_export.contract import KVLayout, io_spec
from gemma_export.models.config import LayerType
from gemma_export.runtime.generate import decode_one_token, forward_chunked, prefill
from gemma_export.runtime.session import DecoderSession
from tests.conftest import TINY
from tests.exporter.test_optimize import _with_graph
from tests.models.test_gemma_vs_transformers import TOL, hf_twin

LENS = [250, 171, 40]  # a ragged batch, left-padded; 250 + NEW fits the context of 256
NEW = 5
CHUNK = 7  # prime: chunks fall at every offset of the window of 8


@pytest.fixture(scope="module")
def graphs(tiny_artifacts, tmp_path_factory):
    """{preset: {"full" | "bounded": dir, "fused": dir}}: each tiny preset's fp32 export
    (the session's), and the same weights with every attention fused onto a shared cache
    (fp32, so transformers stays a tight oracle)."""
    from gemma_export.exporter.optimize import optimize_graph
    from gemma_export.models.config import GemmaConfig

    root = tmp_path_factory.mktemp("longctx")
    out = {}
    for name in TINY:
        plain, _ = tiny_artifacts[name]
        cfg = GemmaConfig.from_dict(json.loads((plain / "manifest.json").read_text())["config"])
        proto = onnx.load(str(plain / "model.onnx"), load_external_data=False)
        assert optimize_graph(proto, cfg=cfg).shared_cache
        _with_graph(plain, root / f"{name}-fused", proto)
        out[name] = {"full": plain, "bounded": plain, "fused": root / f"{name}-fused"}
    return out


def _session(graphs, name, graph) -> DecoderSession:
    return DecoderSession(graphs[name][graph], provider="cpu", full_cache=graph == "full")


def _window(manifest_config: dict, layer: int) -> int | None:
    """The positions a sliding layer needs: itself and the window - 1 before it."""
    sliding = manifest_config["layer_types"][layer] == LayerType.SLIDING.value
    return manifest_config["sliding_window"] - 1 if sliding else None


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


@pytest.mark.parametrize("graph", ["full", "bounded", "fused"])
@pytest.mark.parametrize("name", TINY)
def test_chunked_prefill_matches_one_forward_and_transformers(graphs, name, graph):
    from gemma_export.models.load import load_model

    sess = _session(graphs, name, graph)
    assert sess.shared_cache == (graph == "fused")
    bounded = graph == "bounded" and name != "tiny-gemma1"  # Gemma 1 has no sliding layers
    assert any(k is not None for k in sess.kv_keep) == bounded
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

    sess = _session(graphs, "tiny-gemma3", "bounded")
    _, ids, mask, pos = _batch(sess.vocab_size, seed=1)
    full, _ = forward_chunked(sess, ids, mask, pos, sess.new_cache(3), chunk=CHUNK)
    last, _ = forward_chunked(sess, ids, mask, pos, sess.new_cache(3), chunk=CHUNK, last_only=True)
    assert last.shape == (3, 1, sess.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=0, atol=1e-5)
    with pytest.raises(RuntimeConfigError, match="chunk"):
        forward_chunked(sess, ids, mask, pos, sess.new_cache(3), chunk=0)


@pytest.mark.parametrize("graph", ["bounded", "fused"])
def test_chunks_shrink_as_the_context_grows_same_numbers(graphs, graph, monkeypatch):
    """Past the score budget each chunk takes fewer positions (chunk_at); the chunks then
    fall at uneven offsets and the logits stay those of one forward. The budget is scaled
    down to the tiny presets' context of 256."""
    from gemma_export.runtime import generate

    monkeypatch.setattr(generate, "SCORE_BUDGET", 64 * 64)
    monkeypatch.setattr(generate, "MIN_CHUNK", 5)
    sess = _session(graphs, "tiny-gemma3", graph)
    # One row (the 250-token one, unpadded): a fused graph takes a ragged batch's later
    # chunks one position per forward, which would hide the chunk sizes.
    ids, mask, pos = (a[:1] for a in _batch(sess.vocab_size, seed=2)[1:])
    whole, _ = sess.forward(ids, mask, pos, sess.new_cache(1))
    sizes = []
    forward = sess.forward
    monkeypatch.setattr(sess, "forward", lambda i, *a, **k: sizes.append(i.shape[1]) or forward(i, *a, **k))
    chunked, _ = forward_chunked(sess, ids, mask, pos, sess.new_cache(1), chunk=64)
    assert sizes[0] == 64 and sizes[1] < 64 and min(sizes[:-1]) >= 5 and sum(sizes) == ids.shape[1]
    assert sizes[:-1] == sorted(sizes[:-1], reverse=True), sizes
    assert mask.all()
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=TOL)


def test_concat_cache_continues_only_from_the_newest(graphs):
    """On CPU a concat-layout step writes its presents into the buffers of the cache two
    steps back, so, as with the shared layout, an older cache of the chain is refused
    rather than read after its buffers were reused, and the newest one gives the same
    numbers as a fresh prefill."""
    from gemma_export.errors import RuntimeConfigError

    sess = _session(graphs, "tiny-gemma3", "bounded")
    prompts, _, _, _ = _batch(sess.vocab_size, seed=3)
    state = prefill(sess, prompts, chunk=CHUNK)
    older = state
    for tok in (11, 12, 13):
        state = decode_one_token(sess, state, np.full(3, tok))
    with pytest.raises(RuntimeConfigError, match="newest cache"):
        decode_one_token(sess, older, np.full(3, 11))
    again = prefill(sess, [p + [11, 12, 13] for p in prompts], chunk=CHUNK)
    np.testing.assert_allclose(state.logits, again.logits, rtol=0, atol=TOL)



def test_model_with_bounded_past_matches_transformers():
    """The PyTorch model (what the exporter traces) fed sliding layers' newest W - 1
    positions only, in chunks of 5, equals transformers' one forward over 60 tokens."""
    from tests.models.test_gemma_vs_transformers import variant

    for name in ("tiny-gemma2", "tiny-gemma3"):
        model = variant(name, None)
        hf = hf_twin(model)
        cfg = model.config
        ids = torch.randint(4, cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = hf(input_ids=ids).logits[0]
            past, rows = model.empty_cache(1), []
            for s in range(0, 60, 5):
                logits, past = model(ids[:, s:s + 5], torch.ones(1, s + 5, dtype=torch.long),
                                     torch.arange(s, s + 5)[None], past)
                rows.append(logits[0])
                past = tuple(p if cfg.layer_types[i // 2] == LayerType.GLOBAL else p[:, :, -(cfg.sliding_window - 1):]
                             for i, p in enumerate(past))
        assert {p.shape[2] for i, p in enumerate(past) if cfg.layer_types[i // 2] == LayerType.SLIDING} == {7}
        d = (torch.cat(rows) - ref).abs()
        assert d.max().item() <= TOL, f"{name}: max abs diff {d.max().item():.3g} (mean {d.mean().item():.3g})"


@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3", "tiny-gemma4"])
def test_io_spec_marks_sliding_entries_as_windows(name):
    """Concat layout: exactly the sliding layers' entries are windows keeping W - 1; the
    shared layout and Gemma 4 (whose graph reads every entry full) have none."""
    from gemma_export.models.load import preset_config

    cfg = preset_config(name)
    d = cfg.to_dict()
    for layout in (KVLayout.CONCAT, KVLayout.SHARED):
        inputs = io_spec(cfg, kv_cache=layout)["inputs"]
        for i in range(cfg.num_hidden_layers if name != "tiny-gemma4" else 0):
            for t in ("key", "value"):
                spec = inputs[f"past_key_values.{i}.{t}"]
                want = _window(d, i) if layout == KVLayout.CONCAT else None
                assert spec.get("keep") == want and (spec.get("length") == "window") == (want is not None)
        if name == "tiny-gemma4":
            assert not any("keep" in v for v in inputs.values())


def test_bounded_cache_keeps_windows_and_globals(graphs):
    """Through a chunked prefill and decode, a sliding layer's tensors hold between
    min(T, W - 1) and 2 (W - 1) - 1 positions, a global layer's all T; the manifest says which."""
    name = "tiny-gemma3"
    sess = _session(graphs, name, "bounded")
    cfg = sess.config
    io = sess.manifest.io["inputs"]
    for i in range(cfg["num_hidden_layers"]):
        assert io[f"past_key_values.{i}.key"].get("keep") == _window(cfg, i)
    prompts, *_ = _batch(sess.vocab_size, seed=2)
    state = prefill(sess, prompts, chunk=CHUNK)
    seen = set()
    for step in range(NEW):
        T = state.cache.length
        assert T == max(LENS) + step == state.mask.shape[1]
        for j, v in enumerate(state.cache.values):
            keep = _window(cfg, j // 2)
            held = v.shape()[2]
            if keep is None:
                assert held == T
            else:
                assert min(T, keep) <= held < 2 * keep
                seen.add(held)
        state = decode_one_token(sess, state, state.logits.argmax(-1))
    assert len(seen) > 1  # the window tensors were cut back at least once while decoding


def test_bounded_caches_merge_and_select_like_full(graphs):
    """The server's joins and leaves (merge_caches, select_rows with a trim) on bounded
    caches of different lengths: the logits of the steps after them equal the full cache's."""
    name = "tiny-gemma3"
    outs = []
    for graph in ("full", "bounded"):
        sess = _session(graphs, name, graph)
        rng = np.random.default_rng(4)
        a, b = ([2] + rng.integers(4, sess.vocab_size, n - 1).tolist() for n in (40, 9))
        sa, sb = prefill(sess, [a], chunk=CHUNK), prefill(sess, [b], chunk=CHUNK)
        cache = sess.merge_caches([sa.cache, sb.cache])
        mask = np.zeros((2, 40), np.int64)
        mask[0], mask[1, 31:] = 1, 1
        pos = np.array([[39], [8]])
        tok, rows = np.array([sa.logits[0].argmax(), sb.logits[0].argmax()]), []
        for _ in range(12):
            mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
            pos = pos + 1
            logits, cache = sess.forward(tok[:, None], mask, pos, cache)
            rows.append(logits[:, -1])
            tok = logits[:, -1].argmax(-1)
        # row 0 leaves; row 1's columns before its first token are padding in every kept row
        cache = sess.select_rows(cache, [1], trim=31)
        mask, pos, tok = mask[1:, 31:], pos[1:], tok[1:]
        for _ in range(12):
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
            pos = pos + 1
            logits, cache = sess.forward(tok[:, None], mask, pos, cache)
            rows.append(np.pad(logits[:, -1], ((0, 1), (0, 0))))
            tok = logits[:, -1].argmax(-1)
        outs.append(np.stack(rows))
    np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-5)


@pytest.mark.real
def test_real_270m_1k_prompt_bounded_cache_matches_transformers(real_artifact, hf_real):
    """The real 270M (window 512): a 1000-token corpus prompt prefilled in chunks of 128 on
    the bounded cache, then 8 greedy steps; logits at each step against transformers'
    generate (its own sliding-window cache) within fp32's 1e-3, the same tokens."""
    from gemma_export.contract import CORPUS

    out, _ = real_artifact
    hf, tok = hf_real
    ids = tok(CORPUS.read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :1000]
    assert ids.shape[1] == 1000 and ids[0, 0].item() == 2  # <bos> first
    steps = 8
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    want_tokens = ref.sequences[0, 1000:].numpy()
    want = np.stack([x[0].float().numpy() for x in ref.logits])
    sess = DecoderSession(out, provider="cpu")
    keeps = {k for k in sess.kv_keep if k is not None}
    assert keeps == {sess.config["sliding_window"] - 1}
    state = prefill(sess, [ids[0].tolist()], chunk=128)
    got, tokens = [], []
    for _ in range(steps):
        got.append(state.logits[0])
        tokens.append(int(state.logits[0].argmax()))
        state = decode_one_token(sess, state, np.array(tokens[-1:]))
    d = np.abs(np.stack(got) - want)
    assert d.max() <= 1e-3, f"max abs diff {d.max():.3g} (mean {d.mean():.3g})"
    np.testing.assert_array_equal(tokens, want_tokens)
