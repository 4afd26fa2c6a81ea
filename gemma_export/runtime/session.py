"""An ONNX Runtime session over an artifact: provider choice, IO binding, and a KV
cache that stays where the model runs. No torch.

    sess = DecoderSession(dir, provider="auto")
    cache = sess.new_cache(batch)
    logits, cache = sess.forward(input_ids, attention_mask, position_ids, cache)

The cache is a `KVCache`: OrtValues living on the session's device and the number of
positions they hold. Two layouts, read from the graph's own inputs:
  - concat (the traced graph's contract): each step binds the previous step's
    `present.*` outputs as this step's `past_key_values.*` inputs;
  - shared (the fused integer graphs): one buffer per tensor with room for
    `cache_capacity` positions, bound as both past and present, so the graph writes the
    new positions in place and nothing is copied per step. The buffers grow (doubling,
    the filled part copied once) when a step needs more room.
Either way the cache never makes a host round trip on CUDA; only logits come back to the
host. The same code runs on CPU (device "cpu"), which is how CI covers the CUDA path's
logic.

Bounded cache (concat layout, CPU): the manifest marks sliding layers' entries as window
entries (contract.py) that must keep their newest `keep` = W - 1 positions; the session
lets such a tensor grow to 2 * keep positions and then cuts it back to its newest `keep`,
so the cut (a copy of `keep` positions) happens once per `keep` steps rather than every
step. Global layers keep everything. `KVCache.length` stays the number of positions the
attention_mask covers. On CUDA the cut would go through the host, so window entries stay
full there (as they do in the shared layout).
"""

from __future__ import annotations

import enum
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from gemma_export.contract import (
    CAPACITY, KEEP_INPUT, LENGTH_WINDOW, PAST_PREFIX, PRESENT_PREFIX, entries_from_io, kv_names,
)
from gemma_export.errors import ArtifactError, RuntimeConfigError
from gemma_export.runtime.manifest import Manifest, inside_artifact
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64}


class Provider(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


_ORT_NAMES = {Provider.CPU: "CPUExecutionProvider", Provider.CUDA: "CUDAExecutionProvider"}


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def _host_buffer(n: int, dtype) -> np.ndarray:
    """n elements of host memory for a cache tensor, mapped from the OS on its own: freed,
    it goes back at once, whatever malloc's thresholds would make of buffers that grow
    through every size over a long prompt."""
    dtype = np.dtype(dtype)
    return np.frombuffer(mmap.mmap(-1, max(n, 1) * dtype.itemsize), dtype)[:n]


@dataclass
class _Chain:
    """What the caches of one chain (the same buffers) have in common: the positions
    written so far, and (shared layout) the IO binding that keeps the buffers bound or
    (concat layout on CPU) the host buffers behind `values` and the spare ones the next
    step writes its presents into."""

    filled: int = 0
    binding: Any = None
    buffers: list | None = None
    spare: list | None = None


@dataclass
class KVCache:
    """The KV cache of one batch: `values` (past_key_values.* order) hold `length`
    positions (a bounded window tensor only its newest ones: DecoderSession.kv_keep). A
    shared-layout cache is advanced in place, and a concat-layout cache on CPU lends its
    buffers to the step after next, so only the newest cache of a chain may be fed to the
    next step; `_chain.filled` catches reuse of an older one, which would otherwise
    overwrite positions the newer one relies on."""

    values: list
    length: int
    _chain: _Chain = field(default_factory=_Chain, repr=False)


class DecoderSession:
    """One artifact's decoder graph on one provider."""

    def __init__(
        self,
        artifact_dir: Path | str,
        provider: Provider | str = Provider.AUTO,
        threads: int | None = None,
        verify_checksums: bool = False,
        portable: bool = False,
        full_cache: bool = False,
    ):
        """`full_cache`: keep every position of window entries too (what the graph reads
        exactly either way; benchmarks compare the two)."""
        self.dir = Path(artifact_dir)
        self.manifest = Manifest.read(self.dir)
        # Sizes always (cheap, catches truncation); sha256 on request (reads every byte).
        self.manifest.check_files(self.dir, hashes=verify_checksums)
        self.config: dict[str, Any] = self.manifest.config
        self.num_layers = int(self.config["num_hidden_layers"])
        self.vocab_size = int(self.config["vocab_size"])
        self.max_length = self.manifest.max_length
        self.eos_ids = tuple(self.config["eos_token_ids"])
        self.pad_id = int(self.config["pad_token_id"])
        provider = _parse_provider(provider)
        if provider == Provider.CUDA and not cuda_available():
            raise RuntimeConfigError(
                "--provider cuda: this onnxruntime has no CUDA provider (install onnxruntime-gpu, "
                "not onnxruntime, and make the CUDA libraries loadable)"
            )
        use_cuda = provider == Provider.CUDA or (provider == Provider.AUTO and cuda_available())
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            if threads < 1:
                raise RuntimeConfigError(f"--threads must be >= 1, got {threads}")
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # errors only; ORT warns about unused initializers etc.
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        # A graph per provider where the artifact has one (fp16/bf16: model.cpu.onnx); the
        # contract-exact sibling of a fused integer graph on request (elsewhere model.onnx
        # keeps the contract already).
        name = self.manifest.graph_file("cuda" if use_cuda else "cpu", portable=portable)
        self.model_path = model_path = inside_artifact(self.dir, name, f"{self.dir}: graph")
        io = self.manifest.graph_io(name)
        # The cache as the manifest describes it for this graph: one entry per past/present
        # pair, each with its own kv heads and head dim (Gemma 4: fewer entries than layers,
        # two shapes) and length kind.
        inputs = io["inputs"]
        try:
            self.kv_entries = entries_from_io(io)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ArtifactError(f"{self.dir}: manifest io has a malformed past_key_values entry ({e})") from None
        if not self.kv_entries:
            raise ArtifactError(f"{self.dir}: manifest io has no past_key_values.* inputs")
        self.past_names = kv_names(self.kv_entries, PAST_PREFIX)
        self.present_names = kv_names(self.kv_entries, PRESENT_PREFIX)
        # One (kv_heads, head_dim) per past/present tensor, in past_names order.
        self.kv_shapes = [(e.kv_heads, e.head_dim) for e in self.kv_entries for _ in (0, 1)]
        # Uniform caches (Gemma 1-3) keep the scalar attributes callers used to read.
        self.kv_heads, self.head_dim = self.kv_shapes[0]
        if self.past_names[0] not in inputs or inputs[self.past_names[0]]["dtype"] not in _NP_DTYPES:
            raise ArtifactError(f"{self.dir}: manifest io has no usable {self.past_names[0]}")
        self.kv_dtype = _NP_DTYPES[inputs[self.past_names[0]]["dtype"]]
        # Artifacts from before num_logits_to_keep lack it; they get full logits.
        self.keeps_logits = KEEP_INPUT in inputs
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own Fail / InvalidProtobuf / NoSuchFile types
            raise ArtifactError(f"{model_path}: ONNX Runtime cannot load it ({_one_line(e)})") from e
        took_cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        if provider == Provider.CUDA and not took_cuda:
            raise RuntimeConfigError("--provider cuda: ONNX Runtime could not start the CUDA provider on this machine")
        self.provider = Provider.CUDA if took_cuda else Provider.CPU
        self.device = "cuda" if took_cuda else "cpu"
        past = next(i for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.shared_cache = past.shape[2] == CAPACITY
        # Per past tensor: the newest positions it must keep, None = all (see the docstring).
        bounded = not (full_cache or self.shared_cache or took_cuda)
        self.kv_keep: list[int | None] = [e.keep if bounded and e.length == LENGTH_WINDOW else None
                                          for e in self.kv_entries for _ in (0, 1)]

    # -- cache -------------------------------------------------------------------------------

    def new_cache(self, batch: int, capacity: int = 0) -> KVCache:
        """An empty cache (length 0) on the session's device. `capacity`: positions a
        shared-layout cache reserves up front (it grows on demand either way)."""
        length = capacity if self.shared_cache else 0
        # one array per tensor: a shared-layout buffer is written in place
        return KVCache([self._to_device(np.zeros((batch, kv, length, d), dtype=self.kv_dtype))
                        for kv, d in self.kv_shapes], 0)

    def _to_device(self, a: np.ndarray) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0)

    def _room(self, cache: KVCache, needed: int) -> list[ort.OrtValue]:
        """Shared layout: buffers that hold `needed` positions, the filled ones kept."""
        capacity = cache.values[0].shape()[2]  # every tensor [B, kv_heads_i, capacity, D_i]
        if needed <= capacity:
            return cache.values
        capacity = max(needed, min(2 * capacity, self.max_length))
        out = []
        for v in cache.values:
            b, kv, _, d = v.shape()
            a = np.zeros((b, kv, capacity, d), dtype=self.kv_dtype)
            if cache.length:
                a[:, :, : cache.length] = v.numpy()[:, :, : cache.length]
            out.append(self._to_device(a))
        return out

    # -- rows joining and leaving a batch (the server's continuous batching) ---------------------

    def select_rows(self, cache: KVCache, rows: Sequence[int], trim: int = 0, reserve: int = 0) -> KVCache:
        """A new cache holding `rows` of `cache`, without its first `trim` positions (columns
        that are left padding in every kept row). `reserve`: extra positions a shared-layout
        cache keeps free for the steps to come."""
        return self.merge_caches([cache], reserve, rows=[rows], trims=[trim])

    def merge_caches(self, caches: Sequence[KVCache], reserve: int = 0, rows: Sequence | None = None,
                     trims: Sequence[int] | None = None) -> KVCache:
        """One cache with the rows of `caches` in order, right-aligned: a shorter cache is
        left-padded with zero K/V (its rows' attention_mask must be 0 there), so every
        row's newest position is the last one and all rows advance together. `rows[i]`
        (None: all) and `trims[i]` select rows of caches[i] and drop its first positions,
        as select_rows would, in the same single copy."""
        if not caches:
            raise RuntimeConfigError("merge_caches needs at least one cache")
        rows = list(rows) if rows is not None else [None] * len(caches)
        trims = list(trims) if trims is not None else [0] * len(caches)
        for c, r, t in zip(caches, rows, trims):
            if r is not None and not len(r):
                raise RuntimeConfigError("merge_caches: a cache keeps no rows")
            if not 0 <= t <= c.length:
                raise RuntimeConfigError(f"cannot trim {t} of {c.length} positions")
        spans = [c.length - t for c, t in zip(caches, trims)]
        length = max(spans)
        counts = [c.values[0].shape()[0] if r is None else len(r) for c, r in zip(caches, rows)]
        capacity = max(length, min(length + reserve, self.max_length)) if self.shared_cache else length
        out = []
        for i, (kv, d) in enumerate(self.kv_shapes):
            keep = self.kv_keep[i]
            # A window tensor keeps min(length, keep) columns. A row whose cache holds fewer
            # (its prompt is shorter) is left-padded with zeros where its mask is 0; one that
            # holds more gives its newest.
            cols = capacity if keep is None else min(length, keep)
            end = length if keep is None else cols
            buf = np.zeros((sum(counts), kv, cols, d), self.kv_dtype)
            b0 = 0
            for c, r, t, span, n in zip(caches, rows, trims, spans, counts):
                if keep is None:
                    a = c.values[i].numpy()[:, :, t:c.length]  # [B_c, kv, span, D]; a host copy on CUDA too
                else:
                    held = c.values[i].shape()[2]  # the newest `held` of c's positions
                    m = min(held, span, cols)
                    a = c.values[i].numpy()[:, :, held - m:held]
                buf[b0:b0 + n, :, end - a.shape[2]:end] = a if r is None else a[np.asarray(r, np.int64)]
                b0 += n
            out.append(self._to_device(buf))
        if self.shared_cache:
            return KVCache(out, length, _Chain(filled=length))  # new buffers: a chain of their own
        return KVCache(out, length)

    # -- one step ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: KVCache,
        last_only: bool = False,
    ) -> tuple[np.ndarray, KVCache]:
        """Run the graph once: logits [B, S, V] on the host (with `last_only`, [B, 1, V]
        where the graph can skip the LM head elsewhere), the new cache on the device."""
        total = cache.length + input_ids.shape[1]
        if attention_mask.shape[1] != total:
            raise RuntimeConfigError(f"attention_mask covers {attention_mask.shape[1]} positions; the cache holds "
                                     f"{cache.length} and {input_ids.shape[1]} are fed")
        if not self.shared_cache:
            binding = self.session.io_binding()
            held = self._bind_inputs(binding, input_ids, attention_mask, position_ids, last_only)
            for name, v in zip(self.past_names, cache.values):
                binding.bind_ortvalue_input(name, v)
            if self.device != "cpu":
                binding.bind_output("logits", self.device)  # first: outputs[0]
                for name in self.present_names:
                    binding.bind_output(name, self.device)
                self.session.run_with_iobinding(binding)
                del held
                outputs = binding.get_outputs()  # kv_keep is all None off the CPU: nothing to cut
                return outputs[0].numpy(), KVCache(list(outputs[1:]), total)
            return self._forward_host(binding, held, input_ids, last_only, cache, total)
        if cache.length and input_ids.shape[0] > 1 and input_ids.shape[1] > 1:
            # GroupQueryAttention takes several new tokens onto a filled cache only at batch
            # 1; a batch feeds them one position at a time (the same numbers).
            return self._one_at_a_time(input_ids, attention_mask, position_ids, cache, last_only)
        chain = cache._chain
        if chain.filled != cache.length:
            raise RuntimeConfigError("this cache was advanced by a later step; continue from the newest cache")
        values = self._room(cache, total)
        if values is not cache.values:
            chain = _Chain()
        # The buffers stay bound from step to step: only the step's own inputs and a fresh
        # host array for the logits are bound anew.
        if chain.binding is None:
            chain.binding = self.session.io_binding()
            for past, present, v in zip(self.past_names, self.present_names, values):
                chain.binding.bind_ortvalue_input(past, v)
                chain.binding.bind_ortvalue_output(present, v)
        binding = chain.binding
        held = self._bind_inputs(binding, input_ids, attention_mask, position_ids, last_only)
        logits = self._bind_logits(binding, input_ids, last_only)
        self.session.run_with_iobinding(binding)
        del held
        chain.filled = total
        return logits, KVCache(values, total, chain)

    def _forward_host(self, binding, held, input_ids, last_only, cache: KVCache, total: int):
        """Concat layout on CPU: the presents go into host buffers this session manages,
        not into ONNX Runtime's arena. A present is past + S positions, longer every step,
        and the arena, which cannot reuse the shorter blocks it gets back, grew to several
        times the cache over a long prompt (docs/design.md, "Memory at long context"). Two
        buffers per tensor take turns instead: a step reads its past from one and writes
        its present into the other, which it reuses from the step before last when it is
        large enough (fresh pages cost a decode step more than the copy does)."""
        chain = cache._chain
        if chain.buffers is not None and chain.filled != cache.length:
            raise RuntimeConfigError("this cache was advanced by a later step; continue from the newest cache")
        logits = self._bind_logits(binding, input_ids, last_only)
        spare = chain.spare or [None] * len(cache.values)
        presents, buffers = [], []
        for name, v, (kv, d), buf in zip(self.present_names, cache.values, self.kv_shapes, spare):
            b, _, past, _ = v.shape()
            shape = (b, kv, past + input_ids.shape[1], d)
            n = b * kv * shape[2] * d
            if buf is None or buf.size < n:
                buf = _host_buffer(n + n // 16, self.kv_dtype)  # room to grow a little in place
            a = buf[:n].reshape(shape)
            binding.bind_output(name, "cpu", 0, self.kv_dtype, list(shape), a.ctypes.data)
            presents.append(self._to_device(a))
            buffers.append(buf)
        self.session.run_with_iobinding(binding)
        del held
        values = []
        for i, (p, keep) in enumerate(zip(presents, self.kv_keep)):
            if keep is not None and p.shape()[2] >= 2 * keep:
                # Cut a window tensor back to its newest `keep` (once per `keep` steps) into a
                # buffer of its own, the one behind the value from now on.
                src = p.numpy()[:, :, -keep:]
                buffers[i] = _host_buffer(src.size, self.kv_dtype)
                cut = buffers[i].reshape(src.shape)
                cut[...] = src
                p = self._to_device(cut)
            values.append(p)
        chain.filled = -1  # the cache fed here is spent: its buffers are the next step's spare
        nxt = _Chain(filled=total, buffers=buffers, spare=chain.buffers)
        return logits, KVCache(values, total, nxt)

    def _bind_logits(self, binding, input_ids: np.ndarray, last_only: bool) -> np.ndarray:
        """A fresh host array the run writes the logits into."""
        rows = 1 if last_only and self.keeps_logits else input_ids.shape[1]
        logits = np.empty((input_ids.shape[0], rows, self.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        return logits

    def _one_at_a_time(self, input_ids, attention_mask, position_ids, cache, last_only):
        rows = []
        for j in range(input_ids.shape[1]):
            width = cache.length + 1
            logits, cache = self.forward(input_ids[:, j:j + 1], attention_mask[:, :width], position_ids[:, j:j + 1],
                                         cache)
            rows.append(logits)
        return (rows[-1] if last_only and self.keeps_logits else np.concatenate(rows, axis=1)), cache

    def _bind_inputs(self, binding, input_ids, attention_mask, position_ids, last_only) -> list:
        """Bind the step's own inputs; returns their OrtValues, which must outlive the run
        (on CPU they wrap the numpy memory, and a binding holds only the C value)."""
        ints = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        held = [(name, self._to_device(v.astype(np.int64, copy=False))) for name, v in ints.items()]
        if self.keeps_logits:  # bound every step: a reused binding must not keep the last value
            keep = np.array(1 if last_only else 0, np.int64)
            held.append((KEEP_INPUT, ort.OrtValue.ortvalue_from_numpy(keep)))
        for name, v in held:
            binding.bind_ortvalue_input(name, v)
        return held

    def cache_length(self, cache: KVCache) -> int:
        return cache.length


def _parse_provider(p: Provider | str) -> Provider:
    try:
        return Provider(p)
    except ValueError:
        raise RuntimeConfigError(f"unknown provider {p!r}; choose auto, cpu or cuda") from None


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0][:300] if s else type(e).__name__


def default_threads() -> int | None:
    """GEMMA_EXPORT_THREADS overrides ONNX Runtime's own choice (all physical cores)."""
    v = os.environ.get("GEMMA_EXPORT_THREADS")
    return int(v) if v else None
