"""The decode loop: prefill, then one token per step, on a DecoderSession. No torch.

The engine works on token ids and knows nothing about tokenization (nanochat's rule);
`generate_text` wraps it with a tokenizer, stop strings and streaming; `Generator` (what
`gemma_export.load` returns) is the Python API over that: text in, text(s) out, streaming.

    prefill(sess, prompts)          left-pad a batch, run the prompt in chunks, return state
    forward_chunked(sess, ...)      one forward's worth of positions, PREFILL_CHUNK at a time
    decode_one_token(sess, state)   feed the last sampled tokens, return next logits
    sample(logits, history, cfg)    greedy / temperature / top-k / top-p / repetition penalty
    generate_ids(...)               the loop with stop conditions
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypedDict, overload

import numpy as np

from gemma_export.errors import RuntimeConfigError
from gemma_export.runtime.session import DecoderSession, KVCache

if TYPE_CHECKING:
    import sys

    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already seen
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (text level)
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks, parity)

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= 1_000_000:
            raise RuntimeConfigError(f"--max-new-tokens must be 1..1000000, got {self.max_new_tokens}")
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise RuntimeConfigError(f"--temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise RuntimeConfigError(f"--top-k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise RuntimeConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not (0.0 < self.repetition_penalty <= 100.0):
            raise RuntimeConfigError(f"--repetition-penalty must be in (0, 100], got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise RuntimeConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        if any(not s for s in self.stop):
            raise RuntimeConfigError("--stop strings must not be empty")


# -- sampling (pure functions) ---------------------------------------------------------------


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL / transformers rule: a seen token's positive logit is divided by the penalty,
    a negative one multiplied, so the penalty always lowers its probability."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def sample(logits: np.ndarray, seen: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token from a row of logits [V] (fp32).

    The draw is Generator.choice's (the normalized cdf and one uniform, side="right"), done
    without its O(V) checks and over the top-k candidates only; top-p sorts only as many
    of the most likely tokens as it needs, not all V (at V = 262144 a full sort was ~15 ms a
    row, the server's whole decode step several times over)."""
    logits = apply_repetition_penalty(logits.astype(np.float32, copy=False), seen, cfg.repetition_penalty)
    if cfg.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / cfg.temperature
    cand = None  # token ids still in the running, ascending (None: all of them)
    if cfg.top_k and cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        cand = np.flatnonzero(z >= kth)  # ties with the k-th stay in, as before
        z = z[cand]
    p = np.exp(z - z.max())
    p /= p.sum()
    if cfg.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = _nucleus(p, cfg.top_p)
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    i = int(cdf.searchsorted(rng.random(), side="right"))
    return int(cand[i]) if cand is not None else i


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of p by descending probability (ties by index, as a stable argsort), as many
    as reach `top_p`: found among the m most likely, m growing until the prefix ends
    strictly inside them."""
    m = min(p.size, 64)
    while True:
        part = np.argpartition(-p, m - 1)[:m] if m < p.size else np.arange(p.size)
        part = part[np.lexsort((part, -p[part]))]
        n = int(np.searchsorted(np.cumsum(p[part]), top_p)) + 1
        if n < m or m == p.size:
            return part[:n]
        m = min(p.size, m * 8)


# -- the loop ----------------------------------------------------------------------------------


# Prompt positions per forward. Attention scores of one forward are [B, heads, S, T], so a
# one-shot prefill grows with the square of the prompt; in chunks of C the peak is C x T.
# 512 = the real 270M's sliding window: a chunk of a local layer then attends over at most
# 2 windows of keys.
PREFILL_CHUNK = 512
# Once a chunk's keys pass 1024 positions it shrinks so that its attention scores span at
# most this many query x key positions (down to MIN_CHUNK from 8k on): the peak memory of a long
# prompt's prefill then stays flat instead of growing with the context (docs/design.md,
# "Memory at long context").
SCORE_BUDGET = PREFILL_CHUNK * 1024
MIN_CHUNK = 64


def chunk_at(past: int, chunk: int) -> int:
    """Prompt positions the next forward takes with `past` positions cached: `chunk`, or
    fewer (not under MIN_CHUNK) where past + chunk keys would exceed SCORE_BUDGET."""
    return max(min(chunk, MIN_CHUNK), min(chunk, SCORE_BUDGET // (past + chunk)))


@dataclass
class DecodeState:
    cache: KVCache
    mask: np.ndarray  # [B, T] 1 = real token
    positions: np.ndarray  # [B, 1] position of the last fed token
    logits: np.ndarray  # [B, V] next-token logits


def forward_chunked(sess: DecoderSession, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, cache: KVCache,
                    chunk: int = PREFILL_CHUNK, last_only: bool = False) -> tuple[np.ndarray, KVCache]:
    """sess.forward over ids [B, S] (mask [B, cache.length + S]) in forwards of at most
    `chunk` positions (fewer at long context: chunk_at), each chunk's keys/values the past
    of the next. The same numbers as one forward: every query sees the same keys under the
    same mask. Logits [B, S, V], or [B, 1, V] with `last_only`."""
    if chunk < 1:
        raise RuntimeConfigError(f"prefill chunk must be >= 1, got {chunk}")
    S, past = ids.shape[1], sess.cache_length(cache)
    rows, end = [], 0
    while end < S:
        start, end = end, min(S, end + chunk_at(past + end, chunk))
        last = end == S
        logits, cache = sess.forward(ids[:, start:end], mask[:, :past + end], pos[:, start:end], cache,
                                     last_only=last_only)
        if not last_only:
            rows.append(logits)
        elif last:
            rows.append(logits[:, -1:])
    return (rows[0] if len(rows) == 1 else np.concatenate(rows, axis=1)), cache


def prefill(sess: DecoderSession, prompts: Sequence[Sequence[int]], capacity: int = 0,
            chunk: int = PREFILL_CHUNK) -> DecodeState:
    """Run the left-padded prompts, `chunk` positions per forward; the state holds logits
    for each row's next token. `capacity`: the positions the whole generation will need,
    where the cache can reserve them up front (shared layout); it grows on demand either way."""
    B, width = len(prompts), max(len(p) for p in prompts)
    ids = np.full((B, width), sess.pad_id, np.int64)
    mask = np.zeros((B, width), np.int64)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, cache = forward_chunked(sess, ids, mask, pos, sess.new_cache(B, capacity), chunk, last_only=True)
    return DecodeState(cache, mask, pos[:, -1:], logits[:, -1])


def decode_one_token(sess: DecoderSession, state: DecodeState, tokens: np.ndarray) -> DecodeState:
    """Feed one token per row [B] and return the state with the next logits."""
    mask = np.concatenate([state.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
    pos = state.positions + 1
    logits, cache = sess.forward(tokens[:, None].astype(np.int64), mask, pos, state.cache)
    return DecodeState(cache, mask, pos, logits[:, -1])


@dataclass
class IdsResult:
    tokens: list[list[int]]  # generated ids per row (stop token excluded)
    finish_reasons: list[str]  # "eos" | "length" | "context" | "stop"
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    timings: dict = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)  # after --truncate


def fit_context(prompts: Sequence[Sequence[int]], max_length: int, max_new_tokens: int,
                truncate: bool = False) -> list[list[int]]:
    """The prompts as they will run. A prompt must leave room for at least one new token;
    one that does not is refused (RuntimeConfigError, one line), or with `truncate` cut to
    its first token (<bos>) and its last ones, so that it and `max_new_tokens` fit (at
    least half the context stays prompt)."""
    out = [list(p) for p in prompts]
    keep = max(max_length - max_new_tokens, max_length // 2, 2)
    for i, p in enumerate(out):
        if len(p) < max_length:
            continue
        if not truncate:
            raise RuntimeConfigError(f"prompt of {len(p)} tokens does not fit the model's context of {max_length} "
                                     f"tokens (--truncate keeps its last {keep - 1} tokens)")
        out[i] = p[:1] + p[len(p) - (keep - 1):]
    return out


def generate_ids(
    sess: DecoderSession,
    prompts: Sequence[Sequence[int]],
    cfg: SamplingConfig,
    on_token: Callable[[int, int], bool] | None = None,
    truncate: bool = False,
) -> IdsResult:
    """Generate for a batch of token-id prompts. `on_token(row, id)` is called for every
    generated token and may return True to finish that row (stop strings). A prompt
    that leaves no room in the context is refused, or cut with `truncate` (fit_context);
    a row that reaches the end of the context finishes with "context"."""
    cfg.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise RuntimeConfigError("every prompt needs at least one token")
    prompts = fit_context(prompts, sess.max_length, cfg.max_new_tokens, truncate)
    longest = max(len(p) for p in prompts)
    rng = np.random.default_rng(cfg.seed)
    B = len(prompts)
    eos = set() if cfg.ignore_eos else set(sess.eos_ids)
    out: list[list[int]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    seen = [np.unique(np.asarray(p, np.int64)) for p in prompts]

    t0 = time.perf_counter()
    state = prefill(sess, prompts, capacity=min(sess.max_length, longest + cfg.max_new_tokens))
    t1 = time.perf_counter()
    steps = 0
    while True:
        nxt = np.full(B, sess.pad_id, np.int64)
        for b in range(B):
            if reasons[b] is not None:
                continue
            tok = sample(state.logits[b], seen[b], cfg, rng)
            nxt[b] = tok
            if tok in eos:
                reasons[b] = "eos"
                continue
            out[b].append(tok)
            if cfg.repetition_penalty != 1.0:
                seen[b] = np.union1d(seen[b], [tok])
            if on_token is not None and on_token(b, tok):
                reasons[b] = "stop"
            elif len(out[b]) >= cfg.max_new_tokens:
                reasons[b] = "length"
        if all(r is not None for r in reasons):
            break
        if state.mask.shape[1] + 1 > sess.max_length:
            reasons = [r or "context" for r in reasons]
            break
        state = decode_one_token(sess, state, nxt)
        steps += 1
    t2 = time.perf_counter()
    return IdsResult(out, [r or "length" for r in reasons], t1 - t0, t2 - t1, steps,
                     prompt_lengths=[len(p) for p in prompts])


# -- text level --------------------------------------------------------------------------------


@dataclass
class TextResult:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    prompt_tokens: list[int]
    seconds_to_first_token: float  # prefill + first sample
    decode_tokens_per_second: float  # batch rows x steps / decode time
    provider: str


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """One sequence's text as its ids arrive: never half a UTF-8 character, and never text
    that a stop string may still claim. `push` and `flush` return the text that became
    final; once a stop string appears, `stopped` is set and the text before it is the last.
    Used by `generate_text` and by the server's engine (one per request)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._decoder = tokenizer.stream_decoder()
        self._stop = tuple(stop)
        self._pending = ""  # decoded text held back: it may be the start of a stop string
        self.stopped = False

    def push(self, token_id: int) -> str:
        return self._take(self._decoder.push(token_id))

    def flush(self) -> str:
        """At the end of the sequence: whatever is still held (unless a stop string claims it)."""
        if self.stopped:
            return ""
        text = self._take(self._decoder.flush())
        if self.stopped:
            return text
        text, self._pending = text + self._pending, ""
        return text

    def _take(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        for s in self._stop:
            i = self._pending.find(s)
            if i >= 0:
                self.stopped = True
                out, self._pending = self._pending[:i], ""
                return out
        cut = len(self._pending) - _held_suffix(self._pending, self._stop)
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out


def generate_text(
    sess: DecoderSession,
    tokenizer,
    prompts: Sequence[str],
    cfg: SamplingConfig,
    *,
    chat: bool = False,
    on_text: Callable[[int, str], None] | None = None,
    truncate: bool = False,
) -> TextResult:
    """Text in, text out. `on_text(row, piece)` streams text as it is produced: never half a
    UTF-8 character, and never text that a stop string later claims."""
    from gemma_export.runtime.tokenizer import chat_format, chat_prompt

    if tokenizer.vocab_size != sess.vocab_size:
        raise RuntimeConfigError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is {sess.vocab_size}"
        )
    fmt = chat_format(sess.config.get("family"))  # Gemma 4 has turn markers of its own
    texts_in = [chat_prompt(p, fmt) if chat else p for p in prompts]
    ids = [tokenizer.encode(t, add_bos=True) for t in texts_in]
    B = len(ids)
    streams = [TextStream(tokenizer, cfg.stop) for _ in range(B)]
    done: list[list[str]] = [[] for _ in range(B)]

    def commit(b: int, text: str) -> None:
        if text:
            done[b].append(text)
            if on_text is not None:
                on_text(b, text)

    def on_token(b: int, tok: int) -> bool:
        commit(b, streams[b].push(tok))
        return streams[b].stopped

    res = generate_ids(sess, ids, cfg, on_token, truncate=truncate)
    for b in range(B):
        commit(b, streams[b].flush())
        if streams[b].stopped:
            res.finish_reasons[b] = "stop"
    rate = (res.decode_steps * B / res.decode_seconds) if res.decode_seconds > 0 else 0.0
    return TextResult(
        texts=["".join(d) for d in done],
        token_ids=res.tokens,
        finish_reasons=res.finish_reasons,
        prompt_tokens=res.prompt_lengths,
        seconds_to_first_token=res.prefill_seconds,
        decode_tokens_per_second=rate,
        provider=sess.provider.value,
    )


class Sampling(TypedDict, total=False):
    """SamplingConfig's fields as keyword arguments: `Generator.generate(p, **sampling)`."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    stop: str | Sequence[str]  # one stop string or several
    ignore_eos: bool


# What each keyword may hold: the check runs before SamplingConfig.validate compares numbers.
_SAMPLING_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
    "repetition_penalty": (int, float), "seed": (int, type(None)), "stop": (str, list, tuple), "ignore_eos": (bool,),
}


def sampling_config(**sampling: Any) -> SamplingConfig:
    """A validated SamplingConfig from keyword arguments (the Python API's form);
    RuntimeConfigError for an unknown name, a wrong type or a value out of range."""
    for key, value in sampling.items():
        kinds = _SAMPLING_TYPES.get(key)
        if kinds is None:
            raise RuntimeConfigError(f"unknown sampling option {key!r}; known: {', '.join(_SAMPLING_TYPES)}")
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise RuntimeConfigError(f"sampling option {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                                     f"got {type(value).__name__}")
    stop = sampling.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if not all(isinstance(s, str) for s in stop):
        raise RuntimeConfigError("sampling option 'stop' must be a string or a list of strings")
    cfg = SamplingConfig(**{**sampling, "stop": stop})
    cfg.validate()
    return cfg


class Generator:
    """An artifact ready to generate: its session and its tokenizer. What `gemma_export.load`
    returns.

        gen.generate("Hello", max_new_tokens=16)         -> str
        gen.generate(["Hello", "Bonjour"])               -> list[str] (one left-padded batch)
        for piece in gen.stream("Hello"): ...            -> text as it is produced
        gen.chat([{"role": "user", "content": "Hi"}])    -> the model's reply
        gen.generate_result(prompts, SamplingConfig())   -> TextResult (ids, finish reasons, timing)

    Sampling options are SamplingConfig's fields as keywords (`Sampling`); greedy by default.
    Errors: RuntimeConfigError for bad options or a prompt longer than the context."""

    def __init__(self, session: DecoderSession, tokenizer):
        self.session = session
        self.tokenizer = tokenizer

    @overload
    def generate(self, prompt: str, *, chat: bool = False, **sampling: Unpack[Sampling]) -> str: ...

    @overload
    def generate(self, prompt: Sequence[str], *, chat: bool = False, **sampling: Unpack[Sampling]) -> list[str]: ...

    def generate(self, prompt, *, chat=False, **sampling):
        """The text generated after `prompt` (a str), or after each of `prompts` (a list, run
        as one batch). `chat` wraps each prompt as one user turn of the model family's chat format."""
        prompts = _prompt_list(prompt)
        texts = self.generate_result(prompts, sampling_config(**sampling), chat=chat).texts
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, *, chat: bool = False, **sampling: Unpack[Sampling]) -> Iterator[str]:
        """The text generated after `prompt`, piece by piece as it is produced: never half a
        UTF-8 character, never text a stop string later claims; the pieces join to what
        `generate` returns for the same arguments. Options are checked here, before the first
        piece. The decode loop runs in a worker thread; leaving the loop early stops it."""
        if not isinstance(prompt, str):
            raise RuntimeConfigError(f"stream takes one prompt (a str), got {type(prompt).__name__}")
        return self._stream(prompt, sampling_config(**sampling), chat)

    def chat(self, messages: Sequence[dict], **sampling: Unpack[Sampling]) -> str:
        """The model's reply to a conversation ({"role": "system" | "user" | "assistant",
        "content": str} dicts, the model family's turn format; see tokenizer.format_chat)."""
        from gemma_export.runtime.tokenizer import chat_format, format_chat

        return self.generate(format_chat(messages, fmt=chat_format(self.session.config.get("family"))), **sampling)

    def generate_result(self, prompts: Sequence[str], cfg: SamplingConfig, *, chat: bool = False,
                        on_text: Callable[[int, str], None] | None = None, truncate: bool = False) -> TextResult:
        """Everything about one batch: texts, token ids, finish reasons, timing. `on_text(row,
        piece)` streams (what `stream` and the CLI use); `truncate` keeps <bos> and the prompt's
        last tokens where it would not fit the context (otherwise such a prompt is refused)."""
        return generate_text(self.session, self.tokenizer, prompts, cfg, chat=chat, on_text=on_text,
                             truncate=truncate)

    def _stream(self, prompt: str, cfg: SamplingConfig, chat: bool) -> Iterator[str]:
        pieces: queue.SimpleQueue = queue.SimpleQueue()
        left = threading.Event()  # the consumer stopped iterating

        def on_text(_row: int, text: str) -> None:
            if left.is_set():
                raise _StreamLeft
            pieces.put(text)

        def work() -> None:
            try:
                self.generate_result([prompt], cfg, chat=chat, on_text=on_text)
                pieces.put(_END)
            except BaseException as e:  # handed to the consumer, raised there
                pieces.put(e)

        worker = threading.Thread(target=work, name="gemma-export-stream", daemon=True)
        worker.start()
        try:
            while (item := pieces.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            left.set()
            worker.join()


class _StreamLeft(Exception):
    """Raised inside the worker's callback to end a generation nobody reads any more."""


_END = object()


def _prompt_list(prompt: str | Sequence[str]) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if prompts is None or not all(isinstance(p, str) for p in prompts):
        raise RuntimeConfigError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
    if not prompts:
        raise RuntimeConfigError("no prompts given")
    return prompts


def load_generator(artifact_dir, provider: str = "auto", threads: int | None = None,
                   portable: bool = False, verify_checksums: bool = False, full_cache: bool = False) -> Generator:
    from pathlib import Path

    from gemma_export.errors import ArtifactError
    from gemma_export.runtime.tokenizer import Tokenizer

    sess = DecoderSession(artifact_dir, provider=provider, threads=threads, portable=portable,
                          verify_checksums=verify_checksums, full_cache=full_cache)
    name = sess.manifest.tokenizer
    if not name:
        raise ArtifactError(f"{artifact_dir}: artifact has no tokenizer.model, so it cannot generate text")
    tok = Tokenizer.from_file(Path(artifact_dir) / name)
    if tok.vocab_size != sess.vocab_size:
        raise ArtifactError(
            f"{artifact_dir}: tokenizer has {tok.vocab_size} tokens but the model's vocabulary is {sess.vocab_size}"
        )
    return Generator(sess, tok)
