"""The engine without HTTP: the cache surgery rows joining and leaving need
(DecoderSession.merge_caches / select_rows, both layouts) against single-row runs, and
continuous batching's output against each request run alone."""

from __future__ import annotations

import queue

import numpy as np
import pytest

from gemma_export.runtime.generate import SamplingConfig
from gemma_export.runtime.session import DecoderSession
from gemma_export.runtime.tokenizer import Tokenizer
from gemma_export.server.engine import Engine, Event, PromptTooLongError, QueueFullError

RNG = np.random.default_rng(7)
P1 = [2] + RNG.integers(10, 500, 4).tolist()  # 5 tokens
P2 = [2] + RNG.integers(10, 500, 12).tolist()  # 13 tokens: past the sliding window of 8
FED = RNG.integers(10, 500, 12).tolist()  # tokens fed after the prompts (teacher forcing)


def _solo(sess, prompt, steps):
    """Logits [steps + 1, V] of one row: after the prompt, then after each of FED[:steps]."""
    n = len(prompt)
    out, cache = sess.forward(np.array([prompt]), np.ones((1, n), np.int64), np.arange(n)[None],
                              sess.new_cache(1, 64), last_only=True)
    rows = [out[0, -1]]
    for j in range(steps):
        out, cache = sess.forward(np.array([[FED[j]]]), np.ones((1, n + j + 1), np.int64),
                                  np.array([[n + j]]), cache)
        rows.append(out[0, -1])
    return np.stack(rows)


def _close(a, b, exact):
    if exact:
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    else:  # integer kernels round a batch's rows differently from one row (int8 activations)
        assert np.argmax(a) == np.argmax(b)
        assert np.linalg.norm(a - b) <= 5e-2 * np.linalg.norm(b)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_merge_and_select_match_single_rows(which, tiny_fp32, tiny_int8):
    """Row 1 decodes 3 steps alone, row 2 is prefilled on its own cache and joins
    (right-aligned), both decode together, then row 1 leaves (its columns trimmed) and
    row 2 goes on: every step's logits equal each row's run alone."""
    sess = DecoderSession(tiny_fp32 if which == "fp32" else tiny_int8, provider="cpu")
    assert sess.shared_cache == (which == "int8")
    exact = which == "fp32"
    solo1, solo2 = _solo(sess, P1, 10), _solo(sess, P2, 10)

    n1, n2 = len(P1), len(P2)
    _, c1 = sess.forward(np.array([P1]), np.ones((1, n1), np.int64), np.arange(n1)[None], sess.new_cache(1, 8),
                         last_only=True)
    m1, p1 = np.ones((1, n1), np.int64), n1 - 1
    for j in range(3):
        m1 = np.concatenate([m1, [[1]]], axis=1)
        p1 += 1
        out, c1 = sess.forward(np.array([[FED[j]]]), m1, np.array([[p1]]), c1)
        _close(out[0, -1], solo1[j + 1], exact)
    _, c2 = sess.forward(np.array([P2]), np.ones((1, n2), np.int64), np.arange(n2)[None], sess.new_cache(1, 8),
                         last_only=True)
    # row 1 holds 8 positions, row 2 13: row 1 gets 5 columns of left padding
    cache = sess.merge_caches([c1, c2], reserve=4)
    assert cache.length == 13
    mask = np.concatenate([np.pad(m1, ((0, 0), (13 - m1.shape[1], 0))), np.ones((1, 13), np.int64)])
    pos = np.array([p1, n2 - 1])
    fed = [3, 0]  # index into FED of each row's next token
    for _ in range(4):  # past the reserve: a shared buffer grows on the way
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
        pos = pos + 1
        out, cache = sess.forward(np.array([[FED[fed[0]]], [FED[fed[1]]]]), mask, pos[:, None], cache)
        fed = [f + 1 for f in fed]
        _close(out[0, -1], solo1[fed[0]], exact)
        _close(out[1, -1], solo2[fed[1]], exact)
    # row 1 leaves; row 2 needs every column, so nothing is trimmed; then row 2 alone
    cache = sess.select_rows(cache, [1], trim=0, reserve=2)
    mask, pos = mask[1:], pos[1:]
    for _ in range(3):
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
        pos = pos + 1
        out, cache = sess.forward(np.array([[FED[fed[1]]]]), mask, pos[:, None], cache)
        fed[1] += 1
        _close(out[0, -1], solo2[fed[1]], exact)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_select_trims_columns_padding_in_every_row(which, tiny_fp32, tiny_int8):
    """The long row leaves: the short row's left padding is cut off the timeline."""
    sess = DecoderSession(tiny_fp32 if which == "fp32" else tiny_int8, provider="cpu")
    solo1 = _solo(sess, P1, 2)
    ids = np.full((2, 13), sess.pad_id, np.int64)
    ids[0, 8:], ids[1] = P1, P2
    mask = (np.arange(13)[None] >= np.array([[8], [0]])).astype(np.int64)
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    _, cache = sess.forward(ids, mask, pos, sess.new_cache(2, 16), last_only=True)
    cache0 = sess.select_rows(cache, [0], trim=8)
    assert cache0.length == 5
    out, _ = sess.forward(np.array([[FED[0]]]), np.ones((1, 6), np.int64), np.array([[5]]), cache0)
    _close(out[0, -1], solo1[1], which == "fp32")
    # the same selection inside a merge (one copy): row 0 without its padding, beside a 3-token cache
    _, c3 = sess.forward(np.array([[2, 9, 10]]), np.ones((1, 3), np.int64), np.arange(3)[None], sess.new_cache(1, 8))
    merged = sess.merge_caches([cache, c3], rows=[[0], None], trims=[8, 0])
    assert merged.length == 5
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]])
    out, _ = sess.forward(np.array([[FED[0]], [FED[1]]]), mask, np.array([[5], [3]]), merged)
    _close(out[0, -1], solo1[1], which == "fp32")


# -- the engine ---------------------------------------------------------------------------------


def _engine(path, **kw):
    sess = DecoderSession(path, provider="cpu")
    tok = Tokenizer.from_file(path / "tokenizer.model")
    eng = Engine(sess, tok, **kw)
    eng.start()
    return eng


def _run(eng, prompts, cfgs):
    """Submit all at once; returns [(token ids, text, finish_reason)] per prompt."""
    qs, reqs = [], []
    for p, c in zip(prompts, cfgs):
        q = queue.Queue()
        qs.append(q)
        reqs.append(eng.submit(p, c, q.put))
    out = []
    for q, r in zip(qs, reqs):
        text = []
        while True:
            ev: Event = q.get(timeout=60)
            text.append(ev.text)
            if ev.finish_reason:
                assert ev.completion_tokens == len(r.tokens)
                out.append((r.tokens, "".join(text), ev.finish_reason))
                break
    return out


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(10, 500, int(rng.integers(1, 40))).tolist() for _ in range(n)]


@pytest.mark.parametrize("which,max_batch", [("fp32", 16), ("int8", 16), ("fp32", 5)])
def test_batched_greedy_equals_each_request_alone(which, max_batch, tiny_fp32, tiny_int8):
    """16 requests of different lengths joining and leaving one batch (a small prefill
    chunk makes the long prompts take several chunks between decode steps) give each one
    the greedy tokens it gets alone: fp32 identically, int8 >= 95% of tokens (the parity
    table's top-1 for int8). Rows that finish while others wait stay in the batch until
    the next join drops them in its merge."""
    path = tiny_fp32 if which == "fp32" else tiny_int8
    prompts = _prompts(16)
    lengths = np.random.default_rng(1).integers(4, 24, 16)
    cfgs = [SamplingConfig(max_new_tokens=int(n), ignore_eos=True) for n in lengths]
    eng = _engine(path, max_batch=max_batch, prefill_chunk=16)  # 5: requests wait for rows to leave
    try:
        together = _run(eng, prompts, cfgs)
        alone = [_run(eng, [p], [c])[0] for p, c in zip(prompts, cfgs)]
    finally:
        eng.stop()
    if which == "fp32":
        assert [t[0] for t in together] == [a[0] for a in alone]
        assert [t[1] for t in together] == [a[1] for a in alone]
    else:
        same = sum(x == y for t, a in zip(together, alone) for x, y in zip(t[0], a[0]))
        total = sum(len(a[0]) for a in alone)
        assert same / total >= 0.95, f"{same}/{total}"
    assert all(t[2] == "length" for t in together)


def test_seeded_sampling_does_not_depend_on_neighbours(tiny_fp32):
    eng = _engine(tiny_fp32)
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=50, seed=3, ignore_eos=True)
    try:
        a = _run(eng, _prompts(4), [cfg] * 4)
        b = _run(eng, _prompts(4)[:1], [cfg])
    finally:
        eng.stop()
    assert a[0][0] == b[0][0]


def test_refusals(tiny_fp32):
    eng = _engine(tiny_fp32, max_queue=0)
    try:
        with pytest.raises(QueueFullError):
            eng.submit([2, 3], SamplingConfig(), lambda e: None)
        with pytest.raises(PromptTooLongError):
            eng.submit([2] * 256, SamplingConfig(), lambda e: None)
    finally:
        eng.stop()


class _Faulty:
    """A session whose batched steps fail whenever token 13 is fed: one bad row."""

    def __init__(self, sess):
        self._s = sess

    def __getattr__(self, name):
        return getattr(self._s, name)

    def forward(self, ids, *a, **kw):
        if (ids == 13).any():
            raise RuntimeError("bad row")
        return self._s.forward(ids, *a, **kw)


def test_a_failing_row_ends_alone(tiny_fp32):
    sess = DecoderSession(tiny_fp32, provider="cpu")
    eng = Engine(_Faulty(sess), Tokenizer.from_file(tiny_fp32 / "tokenizer.model"), prefill_chunk=64)
    eng.start()
    try:
        cfg = SamplingConfig(max_new_tokens=6, ignore_eos=True)
        res = _run(eng, [[2, 13, 40], [2, 41, 42], [2, 43]], [cfg] * 3)
        alone = _run(eng, [[2, 41, 42]], [cfg])
    finally:
        eng.stop()
    assert [r[2] for r in res] == ["error", "length", "length"]
    assert res[1][0] == alone[0][0]


def test_drain_refuses_new_work_and_cancels_after_the_grace(tiny_fp32):
    from gemma_export.server.engine import ShuttingDownError
    from tests.server.helpers import SlowSession

    sess = SlowSession(DecoderSession(tiny_fp32, provider="cpu"), delay=0.02)
    eng = Engine(sess, Tokenizer.from_file(tiny_fp32 / "tokenizer.model"))
    eng.start()
    try:
        q = queue.Queue()
        eng.submit([2, 40, 41], SamplingConfig(max_new_tokens=250, ignore_eos=True), q.put)
        eng.drain(0.3)
        with pytest.raises(ShuttingDownError):
            eng.submit([2, 3], SamplingConfig(), lambda e: None)
        while (ev := q.get(timeout=30)).finish_reason is None:
            pass
        assert ev.finish_reason == "cancelled" and 0 < ev.completion_tokens < 250
    finally:
        eng.stop()
