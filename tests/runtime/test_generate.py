"""The decode loop: with a mock model (the loop's logic), and with tiny artifacts
against the PyTorch model (greedy tokens, batches, seeds, stop strings, streaming)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_export.errors import RuntimeConfigError
from gemma_export.runtime.generate import SamplingConfig, fit_context, generate_ids, load_generator, sample
from gemma_export.runtime.session import Provider


class CountingModel:
    """A stand-in session: the next token is always last + 1 (mod V), so the expected
    output of any prompt is known without a network."""

    pad_id, eos_ids, vocab_size, provider = 0, (1,), 50, Provider.CPU

    def __init__(self, max_length=64):
        self.max_length = max_length
        self.calls = []

    def new_cache(self, batch, capacity=0):
        self.capacity = capacity
        return [np.zeros((batch, 0))]

    def cache_length(self, cache):
        return cache[0].shape[1]

    def forward(self, ids, mask, pos, cache, last_only=False):
        self.calls.append((ids.copy(), mask.copy(), pos.copy()))
        assert mask.shape[1] == cache[0].shape[1] + ids.shape[1]
        logits = np.full(ids.shape + (self.vocab_size,), -10.0, np.float32)
        if last_only:  # what a graph with num_logits_to_keep returns
            logits, ids = logits[:, -1:], ids[:, -1:]
        nxt = (ids + 1) % self.vocab_size
        np.put_along_axis(logits, nxt[..., None], 10.0, axis=-1)
        return logits, [np.zeros((ids.shape[0], mask.shape[1]))]


def test_loop_greedy_and_stops_at_eos():
    m = CountingModel()
    res = generate_ids(m, [[2, 40]], SamplingConfig(max_new_tokens=30))
    # 41, 42, ..., 49, then 0 (pad: a normal token here), then 1 = eos -> stop
    assert res.tokens == [list(range(41, 50)) + [0]]
    assert res.finish_reasons == ["eos"]


def test_loop_max_new_tokens_and_left_padding():
    m = CountingModel()
    res = generate_ids(m, [[2, 5, 6, 7], [2, 20]], SamplingConfig(max_new_tokens=3))
    assert res.tokens == [[8, 9, 10], [21, 22, 23]]
    assert res.finish_reasons == ["length", "length"]
    assert m.capacity == 4 + 3  # the cache is asked for room for the prompt and every new token
    ids, mask, pos = m.calls[0]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    _, mask2, pos2 = m.calls[1]
    assert mask2.shape == (2, 5) and pos2.tolist() == [[4], [2]]


def test_loop_stops_at_context_limit():
    m = CountingModel(max_length=8)
    res = generate_ids(m, [[2, 10, 11]], SamplingConfig(max_new_tokens=100))
    assert res.finish_reasons == ["context"]
    assert 3 + len(res.tokens[0]) <= 9
    with pytest.raises(RuntimeConfigError, match="context"):
        generate_ids(m, [list(range(2, 12))], SamplingConfig())


def test_truncate_keeps_bos_and_the_last_tokens():
    m = CountingModel(max_length=8)
    res = generate_ids(m, [list(range(2, 22))], SamplingConfig(max_new_tokens=2), truncate=True)
    ids, _, _ = m.calls[0]
    assert ids.tolist() == [[2, 17, 18, 19, 20, 21]]  # <bos>, then the last tokens: 6 + 2 new fit 8
    assert res.prompt_lengths == [6] and res.tokens == [[22, 23]]
    assert fit_context([[2, 3]], 8, 2) == [[2, 3]]  # a prompt that fits is untouched


@pytest.mark.parametrize(
    "kw",
    [dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
     dict(top_k=-1), dict(repetition_penalty=0.0), dict(seed=-1), dict(temperature=float("nan"))],
)
def test_bad_sampling_options(kw):
    with pytest.raises(RuntimeConfigError):
        SamplingConfig(**kw).validate()


def test_sampling_filters():
    rng = np.random.default_rng(0)
    logits = np.array([5.0, 4.0, 3.0, -50.0], np.float32)
    seen = np.array([], np.int64)
    draws = {sample(logits, seen, SamplingConfig(temperature=1.0, top_k=2), rng) for _ in range(300)}
    assert draws == {0, 1}
    draws = {sample(logits, seen, SamplingConfig(temperature=1.0, top_p=0.5), rng) for _ in range(300)}
    assert draws == {0}  # token 0 alone holds > 50% of the mass
    # repetition penalty: a seen top token loses to the runner-up
    assert sample(np.array([5.0, 4.0]), np.array([0]), SamplingConfig(repetition_penalty=2.0), rng) == 1


def _sample_by_full_sort(logits, cfg, rng):
    """The sampler written plainly: mask, softmax over all V, full stable sort, rng.choice."""
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k:
        z = np.where(z < np.partition(z, -cfg.top_k)[-cfg.top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), cfg.top_p) + 1)]
        p = np.where(np.isin(np.arange(p.size), keep), p, 0.0)
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


@pytest.mark.parametrize("kw", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
                                dict(temperature=1.3, top_k=40), dict(temperature=1.0, top_k=100, top_p=0.5),
                                dict(temperature=2.0, top_p=0.999)])
def test_sample_draws_what_the_plain_sampler_draws(kw):
    """sample() avoids a full sort and choice's checks; with the same generator state it
    draws the same token as the plain formulation, over a vocabulary wider than its
    first top-p candidate set (64)."""
    g = np.random.default_rng(0)
    cfg = SamplingConfig(**kw)
    for i in range(100):
        logits = (g.standard_normal(3000) * g.uniform(0.5, 6)).astype(np.float32)
        got = sample(logits, np.array([], np.int64), cfg, np.random.default_rng(i))
        assert got == _sample_by_full_sort(logits, cfg, np.random.default_rng(i))


# -- on tiny artifacts ------------------------------------------------------------------------


@torch.no_grad()
def _torch_greedy(model, prompt, n, eos):
    ids = torch.tensor([prompt])
    logits, cache = model(ids, torch.ones_like(ids), torch.arange(len(prompt))[None], model.empty_cache(1))
    out = []
    for _ in range(n):
        t = int(logits[0, -1].argmax())
        if t in eos:
            break
        out.append(t)
        p = cache[0].shape[2]
        logits, cache = model(torch.tensor([[t]]), torch.ones(1, p + 1, dtype=torch.long), torch.tensor([[p]]), cache)
    return out


@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_greedy_equals_pytorch_and_batch_equals_alone(tiny_artifacts, name):
    from gemma_export.models.load import load_model

    out, _ = tiny_artifacts[name]
    gen = load_generator(out, provider="cpu")
    model = load_model(name).model
    prompts = ["Hello world", "the cat and the dog were in the garden of the house", "ok"]
    cfg = SamplingConfig(max_new_tokens=24)
    alone = [gen.generate_result([p], cfg) for p in prompts]
    for p, r in zip(prompts, alone):
        ids = gen.tokenizer.encode(p)
        assert r.token_ids[0] == _torch_greedy(model, ids, 24, set(gen.session.eos_ids))
    batch = gen.generate_result(prompts, cfg)
    assert batch.token_ids == [r.token_ids[0] for r in alone]
    assert batch.texts == [r.texts[0] for r in alone]


def test_seeded_sampling_is_reproducible(tiny_artifacts):
    gen = load_generator(tiny_artifacts["tiny-gemma2"][0], provider="cpu")
    cfg = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, seed=123, ignore_eos=True)
    a, b = gen.generate_result(["Hello"], cfg), gen.generate_result(["Hello"], cfg)
    c = gen.generate_result(["Hello"], SamplingConfig(**{**cfg.__dict__, "seed": 124}))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_streaming_and_stop_strings(tiny_artifacts):
    gen = load_generator(tiny_artifacts["tiny-gemma3"][0], provider="cpu")
    cfg = SamplingConfig(max_new_tokens=40, ignore_eos=True)
    full = gen.generate_result(["Hello"], cfg)
    pieces = []
    streamed = gen.generate_result(["Hello"], cfg, on_text=lambda b, t: pieces.append(t))
    assert "".join(pieces) == streamed.texts[0] == full.texts[0]
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in full.texts[0]
    text = full.texts[0]
    if len(text) >= 6:
        stop = text[3:6]
        pieces = []
        res = gen.generate_result(["Hello"], SamplingConfig(max_new_tokens=40, ignore_eos=True, stop=(stop,)),
                                  on_text=lambda b, t: pieces.append(t))
        assert res.finish_reasons == ["stop"]
        assert res.texts[0] == text[: text.find(stop)]
        assert "".join(pieces) == res.texts[0]  # nothing of the stop string was streamed


@pytest.mark.real
def test_real_greedy_text_equals_transformers(real_artifact, hf_real):
    hf, tok = hf_real
    gen = load_generator(real_artifact[0], provider="cpu")
    prompts = ["The capital of France is", "def add(a, b):", "My favourite colour is"]
    ours = gen.generate_result(prompts, SamplingConfig(max_new_tokens=64, ignore_eos=True))
    for p, ids, text in zip(prompts, ours.token_ids, ours.texts):
        enc = tok(p, return_tensors="pt").input_ids
        assert enc[0].tolist() == gen.tokenizer.encode(p)
        ref = hf.generate(enc, max_new_tokens=64, do_sample=False, eos_token_id=None)[0, enc.shape[1]:].tolist()
        assert ids == ref
        assert text == tok.decode(ref)
    alone = gen.generate_result(prompts[:1], SamplingConfig(max_new_tokens=64, ignore_eos=True))
    assert alone.token_ids[0] == ours.token_ids[0]


def test_bench_reports_speed_and_greedy_tokens(tiny_artifacts):
    """`bench` is a measurement, not a timed test: check it runs and reports what it says."""
    from gemma_export.runtime.bench import bench_artifact

    out, _ = tiny_artifacts["tiny-gemma2"]
    res = bench_artifact(out, prompt_tokens=16, new_tokens=8, threads=1, repeats=1)
    assert res["prefill_seconds"] > 0 and res["decode_tokens_per_second"] > 0
    assert len(res["greedy_tokens"]) == 8 and res["peak_rss_bytes"] > 0
    gen = load_generator(out, provider="cpu")
    from gemma_export.runtime.bench import prompt_ids

    ids = prompt_ids(gen.tokenizer, 16)
    alone = generate_ids(gen.session, [ids], SamplingConfig(max_new_tokens=8, ignore_eos=True))
    assert res["greedy_tokens"] == alone.tokens[0]


def test_bench_prompt_repeats_the_corpus_past_its_end():
    """Long-context runs ask for more tokens than the corpus has: the corpus again, <bos> once."""
    from gemma_export.contract import CORPUS
    from gemma_export.exporter.tokenizer_source import preset_tokenizer
    from gemma_export.runtime.bench import prompt_ids
    from gemma_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_bytes(preset_tokenizer(1024, 3))
    whole = tok.encode(CORPUS.read_text(encoding="utf-8"), add_bos=True)
    long = prompt_ids(tok, 2 * len(whole) + 5)
    assert len(long) == 2 * len(whole) + 5 and long[: len(whole)] == whole
    assert long.count(whole[0]) == 1  # <bos> once, first
    assert prompt_ids(tok, 10) == whole[:10]
