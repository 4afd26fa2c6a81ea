"""Parity: the ONNX artifact against the fp32 PyTorch model it came from.

For each fixed prompt:
  1. PyTorch prefill, then greedy decode for `steps` tokens through its KV cache
     (the reference logits and tokens);
  2. ONNX prefill, then decode teacher-forced on the reference tokens, `present` fed back
     as `past`: logits compared step by step, and ONNX's argmax compared with the
     reference token (all equal <=> the greedy texts are identical);
  3. ONNX one full forward over prompt + tokens vs its own prefill+decode;
and once for all prompts left-padded into one ragged batch vs each prompt alone.
Every metric is reported beside its threshold from precision.THRESHOLDS. The report itself
(Metric, ParityReport, the printed table) is gemma_export/parity.py, readable without torch.
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import torch

from gemma_export.contract import CORPUS
from gemma_export.exporter.precision import THRESHOLDS
from gemma_export.models.gemma import GemmaForCausalLM
from gemma_export.parity import Metric, ParityReport
from gemma_export.progress import NULL, Progress
from gemma_export.runtime.session import DecoderSession

# Fixed prompts for models with a tokenizer; random-weight presets use seeded ids
# whose lengths straddle the tiny presets' sliding window (8).
TEXT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
)
RANDOM_PROMPT_LENGTHS = (5, 11, 19)
BATCH_STEPS = 8  # decode steps checked for the ragged batch


PPL_CHUNK = 256  # tokens per perplexity window (each starts with <bos>)


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def make_prompts(vocab_size: int, encode=None, seed: int = 1234) -> list[list[int]]:
    if encode is not None:
        return [list(encode(t)) for t in TEXT_PROMPTS]
    rng = np.random.default_rng(seed)
    # Skip ids 0..3 (pad/eos/bos/unk) so a prompt never ends itself early.
    return [[2] + rng.integers(4, vocab_size, n - 1).tolist() for n in RANDOM_PROMPT_LENGTHS]


# PyTorch reference results per (model, inputs): verifying several precisions of one model
# in one process computes the fp32 reference once.
_REFERENCE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(model: GemmaForCausalLM, key: tuple, fn):
    per_model = _REFERENCE_CACHE.setdefault(model, {})
    if key not in per_model:
        per_model[key] = fn()
    return per_model[key]


def corpus_chunks(encode, bos_id: int, chunk: int = PPL_CHUNK) -> list[list[int]]:
    """The evaluation corpus as windows of `chunk` tokens, each starting with <bos>."""
    ids = encode(CORPUS.read_text(encoding="utf-8"), add_bos=False)
    body = chunk - 1
    return [[bos_id] + ids[i : i + body] for i in range(0, len(ids) - 1, body) if len(ids[i : i + body]) > 1]


def _nll_and_top1(logits: np.ndarray, ids: list[int]) -> tuple[float, np.ndarray]:
    """Summed next-token negative log-likelihood and the argmax per position."""
    x = logits[:-1]
    m = x.max(-1, keepdims=True)
    lse = (np.log(np.exp(x - m).sum(-1, keepdims=True, dtype=np.float64)) + m)[:, 0]
    picked = x[np.arange(len(ids) - 1), ids[1:]].astype(np.float64)
    return float((lse - picked).sum()), x.argmax(-1)


@torch.no_grad()
def torch_corpus(model: GemmaForCausalLM, chunks: list[list[int]]) -> tuple[float, list[np.ndarray]]:
    nll, n, tops = 0.0, 0, []
    for c in chunks:
        ids = torch.tensor([c])
        logits, _ = model(ids, torch.ones_like(ids), torch.arange(len(c))[None], model.empty_cache(1))
        a, top = _nll_and_top1(logits[0].numpy(), c)
        nll, n = nll + a, n + len(c) - 1
        tops.append(top)
    return float(np.exp(nll / n)), tops


def onnx_corpus(sess: DecoderSession, chunks: list[list[int]]) -> tuple[float, list[np.ndarray]]:
    nll, n, tops = 0.0, 0, []
    for c in chunks:
        ids = np.array([c], np.int64)
        logits, _ = sess.forward(ids, np.ones_like(ids), np.arange(len(c))[None], sess.new_cache(1))
        a, top = _nll_and_top1(logits[0], c)
        nll, n = nll + a, n + len(c) - 1
        tops.append(top)
    return float(np.exp(nll / n)), tops


@torch.no_grad()
def torch_greedy(model: GemmaForCausalLM, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Reference: prefill logits [S, V] + `steps` decode rows -> ([S + steps, V], tokens)."""
    ids = torch.tensor([prompt])
    n = len(prompt)
    logits, cache = model(ids, torch.ones_like(ids), torch.arange(n)[None], model.empty_cache(1))
    rows, tokens = [logits[0]], []
    for _ in range(steps):
        tok = int(rows[-1][-1].argmax())
        tokens.append(tok)
        pos = cache[0].shape[2]
        logits, cache = model(
            torch.tensor([[tok]]), torch.ones((1, pos + 1), dtype=torch.long), torch.tensor([[pos]]), cache
        )
        rows.append(logits[0])
    return torch.cat(rows).numpy(), tokens


def onnx_teacher_forced(sess: DecoderSession, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """ONNX prefill + one decode step per reference token (all but the last) -> [S + steps, V]."""
    n = len(prompt)
    ids = np.array([prompt], dtype=np.int64)
    logits, cache = sess.forward(ids, np.ones_like(ids), np.arange(n)[None], sess.new_cache(1))
    rows = [logits[0]]
    for tok in tokens:
        pos = sess.cache_length(cache)
        logits, cache = sess.forward(
            np.array([[tok]]), np.ones((1, pos + 1), np.int64), np.array([[pos]]), cache
        )
        rows.append(logits[0])
    return np.concatenate(rows)


def onnx_ragged_batch(sess: DecoderSession, seqs: list[list[int]], prompt_lens: list[int],
                      steps: int) -> list[np.ndarray]:
    """All prompts left-padded into one batch, then `steps` teacher-forced decode steps.
    Returns, per row, logits [prompt_len + steps, V] for the real positions."""
    B, width = len(seqs), max(prompt_lens)
    ids = np.full((B, width), sess.pad_id, np.int64)
    mask = np.zeros((B, width), np.int64)
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        ids[b, width - n:] = s[:n]
        mask[b, width - n:] = 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, cache = sess.forward(ids, mask, pos, sess.new_cache(B))
    rows = [[logits[b, width - n:]] for b, n in enumerate(prompt_lens)]
    for t in range(steps):
        nxt = np.array([[s[n + t]] for s, n in zip(seqs, prompt_lens)], np.int64)
        mask = np.concatenate([mask, np.ones((B, 1), np.int64)], axis=1)
        pos = pos[:, -1:] + 1
        logits, cache = sess.forward(nxt, mask, pos, cache)
        for b in range(B):
            rows[b].append(logits[b])
    return [np.concatenate(r) for r in rows]


def verify_artifact(
    sess: DecoderSession,
    model: GemmaForCausalLM,
    *,
    encode=None,
    corpus_encode=None,
    steps: int = 64,
    progress: Progress = NULL,
) -> ParityReport:
    """`encode(text)` makes the prompts (None: seeded ids); `corpus_encode(text, add_bos)`
    tokenizes the evaluation corpus for perplexity (None: skipped)."""
    t0 = time.perf_counter()
    precision = sess.manifest.precision
    th = THRESHOLDS[precision]
    prompts = make_prompts(sess.vocab_size, encode)

    max_abs, rel, agree, total, nonfinite, incr = 0.0, 0.0, 0, 0, 0, 0.0
    incr_agree, incr_total = 0, 0
    seqs, onnx_rows = [], []
    for i, prompt in enumerate(prompts):
        progress.count("comparing prompts", i, len(prompts))
        ref, tokens = _cached(model, ("greedy", tuple(prompt), steps),
                              lambda prompt=prompt: torch_greedy(model, prompt, steps))
        got = onnx_teacher_forced(sess, prompt, tokens)
        nonfinite += int((~np.isfinite(got)).sum())
        max_abs = max(max_abs, _max_abs(got, ref))
        rel = max(rel, _rel_l2(got, ref))
        n = len(prompt)
        onnx_top1 = got[n - 1:-1].argmax(-1)  # the prediction at each fed position
        agree += int((onnx_top1 == np.array(tokens)).sum())
        total += len(tokens)
        # One forward over everything vs prefill + decode.
        full_ids = np.array([prompt + tokens[:-1]], np.int64)
        full, _ = sess.forward(full_ids, np.ones_like(full_ids), np.arange(full_ids.shape[1])[None], sess.new_cache(1))
        incr = max(incr, _rel_l2(got[:-1], full[0]))
        incr_agree += int((got[:-1].argmax(-1) == full[0].argmax(-1)).sum())
        incr_total += full.shape[1]
        seqs.append(prompt + tokens)
        onnx_rows.append(got)
    progress.count("comparing prompts", len(prompts), len(prompts))

    batch_steps = min(BATCH_STEPS, steps)
    lens = [len(p) for p in prompts]
    batched = onnx_ragged_batch(sess, seqs, lens, batch_steps)
    pairs = [(b, alone[: n + batch_steps]) for b, alone, n in zip(batched, onnx_rows, lens)]
    batch_rel = max(_rel_l2(b, a) for b, a in pairs)
    batch_agree = float(np.mean(np.concatenate([b.argmax(-1) == a.argmax(-1) for b, a in pairs])))

    metrics = []
    ppl_rows: list[Metric] = []
    if corpus_encode is not None:
        progress.count("perplexity", 0, 1)
        chunks = corpus_chunks(corpus_encode, int(sess.config["bos_token_id"]))
        key = ("corpus", tuple(map(tuple, chunks)))
        ref_ppl, ref_top = _cached(model, key, lambda: torch_corpus(model, chunks))
        got_ppl, got_top = onnx_corpus(sess, chunks)
        progress.count("perplexity", 1, 1)
        agree_c = float(np.mean(np.concatenate([a == b for a, b in zip(got_top, ref_top)])))
        n_tok = sum(len(c) - 1 for c in chunks)
        ppl_rows = [
            Metric("corpus perplexity, PyTorch fp32", ref_ppl, None, "info"),
            Metric("corpus perplexity, artifact", got_ppl, None, "info"),
            Metric(
                "corpus perplexity increase",
                got_ppl / ref_ppl - 1.0,
                th.perplexity_increase,
                "<=" if th.perplexity_increase is not None else "info",
            ),
            Metric(f"corpus top-1 agreement ({n_tok} tokens)", agree_c, th.top1_agreement, ">="),
        ]
    if th.max_abs_diff is not None:
        metrics.append(Metric("logits max abs diff", max_abs, th.max_abs_diff, "<="))
    if th.rel_l2 is not None:
        metrics.append(Metric("logits relative L2", rel, th.rel_l2, "<="))
    metrics += [
        Metric(f"greedy top-1 agreement ({total} steps)", agree / max(total, 1), th.top1_agreement, ">="),
        Metric("non-finite logits", nonfinite, 0, "<="),
        *_consistency("prefill+decode vs one forward", incr, incr_agree / max(incr_total, 1), th),
        *_consistency("ragged batch vs alone", batch_rel, batch_agree, th),
        *ppl_rows,
    ]
    return ParityReport(
        precision=precision.value,
        passed=all(m.passed for m in metrics),
        metrics=metrics,
        prompts=lens,
        steps=steps,
        seconds=round(time.perf_counter() - t0, 2),
    )


def _consistency(name: str, rel: float, top1: float, th) -> list[Metric]:
    """Two ONNX paths that must compute the same thing: by rel L2 where the precision has a
    logits criterion, else by top-1 agreement (rel L2 then reported, see precision.py)."""
    if th.consistency_rel_l2 is not None:
        return [Metric(f"{name} (rel L2)", rel, th.consistency_rel_l2, "<=")]
    return [Metric(f"{name} (top-1)", top1, th.top1_agreement, ">="), Metric(f"{name} (rel L2)", rel, None, "info")]
