"""Continuous batching on one DecoderSession. Knows nothing about HTTP.

One engine thread owns the session. Requests wait in a bounded queue; between two decode
steps of the running batch the engine prefills waiting prompts (several short ones
together, a long one a chunk at a time), and when a prefill is done its rows join the
running batch. Every step then feeds one token per running row, so the weights are read
once for all of them. A row leaves at the step after it finishes.

The running batch shares one left-padded KV timeline: each row's tokens are contiguous
and end at the last cache slot, so all rows advance one slot per step, each with its own
position_ids (a count of its own tokens) and attention_mask (0 on its left padding):

    slot      0   1   2   3   4   5
    row 0     .   .   a0  a1  a2  a3     mask 0 0 1 1 1 1, next position 4
    row 1     b0  b1  b2  b3  b4  b5     mask 1 1 1 1 1 1, next position 6

Sliding windows work by cache index, which equals position distance under this
alignment. Copies happen only when rows join (DecoderSession.merge_caches right-aligns
the two timelines) or leave (select_rows, which also drops columns that became padding
for every row, so the timeline is as long as its longest row).

Results go out through each request's `on_event` callback, called on the engine thread;
the HTTP layer turns that into an asyncio queue with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from gemma_export.runtime.generate import SamplingConfig, TextStream, chunk_at, sample
from gemma_export.runtime.session import DecoderSession, KVCache

log = logging.getLogger("gemma_export.server")

PREFILL_CHUNK = 256  # prompt tokens per prefill forward while other rows are decoding
RESERVE = 128  # free positions a merged shared-layout cache keeps, so it rarely regrows


class EngineError(Exception):
    """Base of what `Engine.submit` refuses."""


class QueueFullError(EngineError):
    def __init__(self, depth: int):
        super().__init__(f"the server is busy: {depth} requests are waiting; retry later")


class ShuttingDownError(EngineError):
    def __init__(self):
        super().__init__("the server is shutting down and takes no new requests")


class PromptTooLongError(EngineError):
    def __init__(self, n: int, context: int):
        super().__init__(f"the prompt has {n} tokens; this model's context is {context} tokens, "
                         "and at least one must be left to generate")


@dataclass
class Event:
    """What the engine tells a request. `text`: new final text (may be "" for a token
    that completes no character yet). `finish_reason` on the last event: "stop"
    (eos or a stop string), "length" (max tokens or the context), "cancelled", or
    "error" with `error` set."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Observer:
    """What the engine reports for metrics; the default ignores it all."""

    def queue_depth(self, n: int) -> None: ...
    def running(self, n: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def tokens(self, prompt: int = 0, generated: int = 0) -> None: ...


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One request inside the engine."""

    prompt: list[int]
    cfg: SamplingConfig
    on_event: Callable[[Event], None]
    stream: TextStream
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False  # set from any thread; the engine drops the row at its next step
    prefill_alone: bool = False  # a batched prefill with it failed: retry it on its own
    finished: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    last_token_at: float = 0.0

    def __post_init__(self):
        self.rng = np.random.default_rng(self.cfg.seed)
        self.seen = np.unique(np.asarray(self.prompt, np.int64))

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Batch:
    """Rows sharing one cache timeline, each with the token it feeds next."""

    seqs: list[Request]
    cache: KVCache
    mask: np.ndarray  # [B, T] 1 = real token
    pos: np.ndarray  # [B] position of the newest token in the cache
    next_tokens: np.ndarray  # [B]


@dataclass
class _Prefill:
    """Prompts being prefilled together on their own cache (left-padded)."""

    seqs: list[Request]
    ids: np.ndarray  # [B, W]
    mask: np.ndarray  # [B, W]
    pos: np.ndarray  # [B, W]
    cache: KVCache
    done: int = 0  # columns fed so far
    logits: np.ndarray | None = None  # [B, V] after the last chunk


def _live(batch: _Batch) -> list[int]:
    """Indices of the rows still generating."""
    return [i for i, s in enumerate(batch.seqs) if not s.finished]


class Engine:
    """Continuous batching over `session`; `tokenizer` only turns tokens into text."""

    def __init__(
        self,
        session: DecoderSession,
        tokenizer,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        prefill_chunk: int = PREFILL_CHUNK,
        observer: Observer | None = None,
    ):
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1, max_queue >= 0")
        self.session = session
        self.tokenizer = tokenizer
        self.max_length = session.max_length
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.obs = observer or Observer()
        self._eos = frozenset(session.eos_ids)
        self._cv = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._accepting = True
        self._stop = False
        self._deadline: float | None = None  # drain: cancel what is left after this time
        self._batch: _Batch | None = None
        self._prefill: _Prefill | None = None
        self._thread = threading.Thread(target=self._run, name="gemma-export-engine", daemon=True)

    # -- the other threads' side -------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: Sequence[int], cfg: SamplingConfig, on_event: Callable[[Event], None]) -> Request:
        """Queue a request; `on_event` is called on the engine thread. Raises
        QueueFullError, ShuttingDownError or PromptTooLongError."""
        cfg.validate()
        if not prompt or len(prompt) >= self.max_length:
            raise PromptTooLongError(len(prompt), self.max_length)
        seq = Request(list(prompt), cfg, on_event, TextStream(self.tokenizer, cfg.stop))
        with self._cv:
            if not self._accepting:
                raise ShuttingDownError()
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(len(self._waiting))
            self._waiting.append(seq)
            self.obs.queue_depth(len(self._waiting))
            self._cv.notify()
        return seq

    def drain(self, grace: float) -> None:
        """Stop admission; what was accepted finishes, or is cancelled after `grace` seconds."""
        with self._cv:
            self._accepting = False
            self._deadline = time.monotonic() + grace
            self._cv.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel everything and end the engine thread."""
        with self._cv:
            self._accepting = False
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._batch or self._prefill)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self.busy):
                    self._cv.wait()
                if self._stop:
                    self._cancel_all()
                    return
                if self._deadline is not None and time.monotonic() > self._deadline:
                    self._cancel_all()  # the drain's grace period is over
                    continue
            try:
                self._drop_cancelled()
                self._admit()
                if self._prefill is not None:
                    self._prefill_chunk()
                if self._batch is not None:
                    self._decode_step()
            except Exception:  # a bug in the engine itself: fail what is in flight, keep serving
                log.exception("engine step failed; failing the requests in flight")
                self._fail_in_flight("internal error in the engine step")

    def _admit(self) -> None:
        """Start a prefill of waiting prompts if there is room in the batch."""
        if self._prefill is not None:
            return
        room = self.max_batch - (len(_live(self._batch)) if self._batch else 0)
        with self._cv:
            if room <= 0 or not self._waiting:
                return
            seqs = [self._waiting.popleft()]
            alone = seqs[0].prefill_alone or len(seqs[0].prompt) > self.prefill_chunk
            # Short prompts go together, up to a budget of padded tokens per forward (a
            # prompt chunk while other rows decode, four when nothing else is waiting on us).
            budget = self.prefill_chunk * (1 if self._batch else 4)
            if not alone:
                while self._waiting and len(seqs) < room:
                    nxt = self._waiting[0]
                    width = max(len(nxt.prompt), *(len(s.prompt) for s in seqs))
                    if nxt.prefill_alone or len(nxt.prompt) > self.prefill_chunk or width * (len(seqs) + 1) > budget:
                        break
                    seqs.append(self._waiting.popleft())
            self.obs.queue_depth(len(self._waiting))
        B, W = len(seqs), max(len(s.prompt) for s in seqs)
        ids = np.full((B, W), self.session.pad_id, np.int64)
        mask = np.zeros((B, W), np.int64)
        for b, s in enumerate(seqs):
            ids[b, W - len(s.prompt):] = s.prompt
            mask[b, W - len(s.prompt):] = 1
        pos = np.clip(mask.cumsum(-1) - 1, 0, None)
        capacity = min(self.max_length, W + RESERVE)
        self._prefill = _Prefill(seqs, ids, mask, pos, self.session.new_cache(B, capacity))

    def _prefill_chunk(self) -> None:
        p = self._prefill
        if all(s.cancelled for s in p.seqs):
            self._prefill = None
            for s in p.seqs:
                self._finish(s, "cancelled")
            return
        # Several rows go in one forward (W <= prefill_chunk); one long prompt a chunk at a time.
        end = min(p.ids.shape[1], p.done + chunk_at(p.done, self.prefill_chunk)) if len(p.seqs) == 1 else p.ids.shape[1]
        try:
            logits, p.cache = self.session.forward(
                p.ids[:, p.done:end], p.mask[:, :end], p.pos[:, p.done:end], p.cache, last_only=True)
        except Exception as e:
            self._prefill = None
            if len(p.seqs) > 1:  # retry each prompt alone, so one bad prompt fails alone
                log.warning("batched prefill failed (%s); retrying its %d prompts one by one", e, len(p.seqs))
                for s in p.seqs:
                    s.prefill_alone = True
                with self._cv:
                    self._waiting.extendleft(reversed(p.seqs))
                return
            self._fail(p.seqs[0], e)
            return
        p.done = end
        if end < p.ids.shape[1]:
            return
        self._prefill = None
        for s in p.seqs:
            self.obs.tokens(prompt=len(s.prompt))
        nxt = np.full(len(p.seqs), self.session.pad_id, np.int64)
        for b, s in enumerate(p.seqs):
            nxt[b] = self._next_token(s, logits[b, -1], int(p.pos[b, -1]))
        keep = [b for b, s in enumerate(p.seqs) if not s.finished]
        if not keep:
            return
        cache = p.cache if len(keep) == len(p.seqs) else self.session.select_rows(p.cache, keep, reserve=RESERVE)
        joining = _Batch([p.seqs[b] for b in keep], cache, p.mask[keep], p.pos[keep, -1], nxt[keep])
        self._join(joining)

    def _join(self, new: _Batch) -> None:
        """New rows join the running batch; finished rows still in it leave in the same copy."""
        old = self._batch
        live = _live(old) if old is not None else []
        if not live:
            self._batch = new
        else:
            mask = old.mask[live]
            trim = int(np.argmax(mask.any(axis=0)))  # leading columns no remaining row uses
            mask = mask[:, trim:]
            T = max(mask.shape[1], new.mask.shape[1])
            pad = lambda m: np.pad(m, ((0, 0), (T - m.shape[1], 0)))  # noqa: E731
            cache = self.session.merge_caches([old.cache, new.cache], reserve=RESERVE, rows=[live, None],
                                              trims=[trim, 0])
            self._batch = _Batch([old.seqs[i] for i in live] + new.seqs, cache,
                                 np.concatenate([pad(mask), pad(new.mask)]), np.concatenate([old.pos[live], new.pos]),
                                 np.concatenate([old.next_tokens[live], new.next_tokens]))
        self.obs.running(len(self._batch.seqs))

    def _decode_step(self) -> None:
        b = self._batch
        mask = np.concatenate([b.mask, np.ones((len(b.seqs), 1), np.int64)], axis=1)
        pos = b.pos + np.array([not s.finished for s in b.seqs])  # a finished row waiting to leave stays put
        try:
            logits, cache = self.session.forward(b.next_tokens[:, None], mask, pos[:, None], b.cache)
        except Exception as e:
            log.warning("batched decode step failed (%s); stepping its %d rows one by one", e, len(b.seqs))
            self._step_rows_alone(e)
            return
        b.cache, b.mask, b.pos = cache, mask, pos
        for i, s in enumerate(b.seqs):
            b.next_tokens[i] = self._next_token(s, logits[i, -1], int(pos[i]))
        self._leave()

    def _step_rows_alone(self, first_error: Exception) -> None:
        """A batched step raised: run each row alone from the same cache; rows that fail
        again end with an error, the others rejoin."""
        b, self._batch = self._batch, None
        live = _live(b)
        for i in live:
            s = b.seqs[i]
            if len(live) == 1:
                self._fail(s, first_error)
                break
            try:
                cache = self.session.select_rows(b.cache, [i], reserve=RESERVE)
                mask = np.concatenate([b.mask[i:i + 1], np.ones((1, 1), np.int64)], axis=1)
                logits, cache = self.session.forward(b.next_tokens[i:i + 1, None], mask, b.pos[i:i + 1, None] + 1,
                                                     cache)
            except Exception as e:
                self._fail(s, e)
                continue
            tok = self._next_token(s, logits[0, -1], int(b.pos[i]) + 1)
            if not s.finished:
                self._join(_Batch([s], cache, mask, b.pos[i:i + 1] + 1, np.array([tok], np.int64)))
        if self._batch is not None:
            self._leave()
        self.obs.running(len(_live(self._batch)) if self._batch else 0)

    def _next_token(self, s: Request, logits: np.ndarray, pos: int) -> int:
        """Sample a row's next token and tell its request; `pos` is the position of the
        newest token in the cache. Errors end this row only."""
        if s.finished:
            return self.session.pad_id
        try:
            tok = sample(logits, s.seen, s.cfg, s.rng)
            now = time.perf_counter()
            if not s.tokens:
                self.obs.first_token(now - s.submitted)
            else:
                self.obs.inter_token(now - s.last_token_at)
            s.last_token_at = now
            if tok in self._eos and not s.cfg.ignore_eos:
                self._finish(s, "stop")
                return tok
            s.tokens.append(tok)
            self.obs.tokens(generated=1)
            if s.cfg.repetition_penalty != 1.0:
                s.seen = np.union1d(s.seen, [tok])
            text = s.stream.push(tok)
            if s.stream.stopped:
                self._finish(s, "stop", text)
            elif len(s.tokens) >= s.cfg.max_new_tokens or pos + 2 > self.max_length:
                self._finish(s, "length", text)
            elif text:
                s.on_event(Event(text))
            return tok
        except Exception as e:
            self._fail(s, e)
            return self.session.pad_id

    def _finish(self, s: Request, reason: str, text: str = "") -> None:
        if s.finished:
            return
        s.finished = True
        if reason in ("stop", "length"):
            text += s.stream.flush()
            if s.stream.stopped:
                reason = "stop"
        try:
            s.on_event(Event(text, reason, len(s.prompt), len(s.tokens)))
        except Exception:
            log.exception("request %d: its event callback failed", s.id)

    def _fail(self, s: Request, e: BaseException) -> None:
        log.error("request %d failed: %s: %s", s.id, type(e).__name__, e)
        if not s.finished:
            s.finished = True
            try:
                s.on_event(Event(finish_reason="error", prompt_tokens=len(s.prompt),
                                 completion_tokens=len(s.tokens), error=f"{type(e).__name__}: {e}"))
            except Exception:
                log.exception("request %d: its event callback failed", s.id)

    def _leave(self) -> None:
        """Finished rows leave the batch (columns that are padding in every row left are
        trimmed). While a join is coming (a prefill under way, requests waiting) and most
        rows are live, the copy is left to the join's merge, which drops them in the same
        pass; until then they stay as rows whose output is ignored: one more row in a step
        instead of one more copy of the whole cache."""
        b = self._batch
        keep = _live(b)
        self.obs.running(len(keep))
        if len(keep) == len(b.seqs):
            return
        join_coming = self._prefill is not None or bool(self._waiting)
        if keep and join_coming and 2 * len(keep) >= len(b.seqs) and b.mask.shape[1] + 2 < self.max_length:
            return
        if not keep:
            self._batch = None
        else:
            mask = b.mask[keep]
            trim = int(np.argmax(mask.any(axis=0)))  # leading columns no row uses
            cache = self.session.select_rows(b.cache, keep, trim=trim, reserve=RESERVE)
            self._batch = _Batch([b.seqs[i] for i in keep], cache, mask[:, trim:], b.pos[keep], b.next_tokens[keep])

    def _drop_cancelled(self) -> None:
        with self._cv:
            gone = [s for s in self._waiting if s.cancelled]
            for s in gone:
                self._waiting.remove(s)
            if gone:
                self.obs.queue_depth(len(self._waiting))
        for s in gone:
            self._finish(s, "cancelled")
        if self._batch is not None:
            for s in self._batch.seqs:
                if s.cancelled:
                    self._finish(s, "cancelled")
            self._leave()

    def _cancel_all(self) -> None:
        """(holding the lock) Cancel everything queued and in flight."""
        for s in self._waiting:
            s.cancelled = True
        for part in (self._batch, self._prefill):
            for s in part.seqs if part else ():
                s.cancelled = True
        waiting, self._waiting = list(self._waiting), collections.deque()
        in_flight = (self._batch.seqs if self._batch else []) + (self._prefill.seqs if self._prefill else [])
        self._batch = self._prefill = None
        for s in waiting + in_flight:
            self._finish(s, "cancelled")
        self.obs.queue_depth(0)
        self.obs.running(0)

    def _fail_in_flight(self, message: str) -> None:
        in_flight = (self._batch.seqs if self._batch else []) + (self._prefill.seqs if self._prefill else [])
        self._batch = self._prefill = None
        for s in in_flight:
            self._fail(s, RuntimeError(message))
        self.obs.running(0)
