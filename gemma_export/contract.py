"""The artifact contract, in one place: what every reader and writer of an artifact agrees on.

Owns the ONNX decoder's I/O names, dims and dtypes (`io_spec`), the two KV cache layouts,
the optional `num_logits_to_keep` input, the names of the files in an artifact directory,
the tied embedding's initializer name, and where the shipped evaluation corpus and the
held-out evaluation texts live.
The exporter writes by these names, the rewrites and the runtime read by them, and the
manifest carries `io_spec` so consumers need not import this module. No torch, no onnx:
the runtime and the server import it.

The table it generates (docs/design.md, "The ONNX contract"):

    in  input_ids                 int64  [batch_size, sequence_length]
    in  attention_mask            int64  [batch_size, total_sequence_length]
    in  position_ids              int64  [batch_size, sequence_length]
    in  past_key_values.{i}.key   kv     [batch_size, kv_heads, past_sequence_length, head_dim]
    in  num_logits_to_keep        int64  []  (optional, default 0 = every position)
    out logits                    fp32   [batch_size, sequence_length, vocab]
    out present.{i}.key           kv     [batch_size, kv_heads, total_sequence_length, head_dim]

In the shared layout past and present are one buffer of `cache_capacity` positions.

A concat-layout entry of a sliding layer (Gemma 1-3) is a window entry: its io_spec says
`"length": "window", "keep": W - 1` (W = sliding_window), and its past may hold only the
newest n positions of the P the attention_mask covers, for any n with
min(P, keep) <= n <= P: the graph masks that layer by its own past's length, position_ids
stay absolute. n = P (every entry full, what onnxruntime-genai and Optimum feed) is the
plain contract. The shared layout keeps every entry full.

The cache is described as data, one `KVEntry` per past/present pair (`kv_entries`): which
layers read it, its kv heads and head dim. Gemma 1-3 have one entry per layer, all of one
shape. Gemma 4 has fewer entries than layers (its KV-shared layers read an earlier
layer's entry; nothing is stored twice) and per-layer-type shapes (wider global heads).
io_spec writes each entry's `layers` beside its dtype and shape, so a reader of the
manifest alone knows the cache it must allocate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Precision(str, enum.Enum):
    """What an artifact's weights are; the manifest's `precision`."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"
    GGUF = "gguf"  # the GGUF source's own quantized blocks, carried without re-rounding


class KVLayout(str, enum.Enum):
    """How a graph's cache tensors relate from one step to the next."""

    # The traced graph's contract: past holds the P earlier positions, present = past + S new.
    CONCAT = "concat"
    # The fused integer graphs: past and present are the same buffer of CAPACITY positions,
    # the first T - S filled; the graph writes the new positions in place and the caller
    # binds each present.* output to its past_key_values.* input's memory.
    SHARED = "shared"


# -- symbolic dims (the names onnxruntime-genai and Optimum read) -------------------------------

BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
CAPACITY = "cache_capacity"  # the shared layout's past/present length

# -- I/O names ----------------------------------------------------------------------------------

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_PREFIX = "past_key_values"
PRESENT_PREFIX = "present"
# Optional input (an initializer that is also a graph input, default 0 = all positions):
# how many trailing positions get logits. Prefill feeds 1.
KEEP_INPUT = "num_logits_to_keep"

# -- the artifact directory ---------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"  # the graph for the artifact's own runtime (fused where the recipe fuses)
DATA_FILE = "model.onnx.data"  # every weight, read by every graph of the artifact
CPU_MODEL_FILE = "model.cpu.onnx"  # fp16/bf16: the CPU graph that rounds as a narrow GEMM does
PORTABLE_MODEL_FILE = "model.portable.onnx"  # fused integer graphs: the contract-exact sibling
TOKENIZER_FILE = "tokenizer.model"  # SentencePiece
PARITY_FILE = "parity.json"  # the full verify report
HF_CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
# For other runtimes (exporter/hf_tokenizer.py, exporter/clients.py):
HF_TOKENIZER_FILE = "tokenizer.json"  # the `tokenizers` library's format
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # special tokens, chat template
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
GENAI_CONFIG_FILE = "genai_config.json"  # onnxruntime-genai
TFJS_DIR = "onnx"  # transformers.js (and Optimum): onnx/model{dtype suffix}.onnx + .onnx_data

# The tied input embedding / LM head: one initializer of this name in every traced graph.
EMBED_WEIGHT = "model.embed_tokens.weight"
# Gemma 4's per-layer input embeddings (PLE): only ever gathered, never multiplied.
PLE_WEIGHT = "model.embed_tokens_per_layer.weight"

# Real redistributable text for perplexity and benchmarks (sources: EVAL_CORPUS_SOURCES.md
# beside it); shipped as package data so the torch-free runtime can read it too.
CORPUS = Path(__file__).resolve().parent / "exporter" / "data" / "eval_corpus.txt"
# Held-out evaluation text, one file per domain (sources: SOURCES.md there): never used to
# calibrate or tune a recipe, reported by `verify` per domain beside the corpus.
HELDOUT_DIR = CORPUS.parent / "heldout"
HELDOUT_DOMAINS = ("english", "dialogue", "korean", "japanese", "russian", "code", "math")


def heldout_text(domain: str) -> str:
    return (HELDOUT_DIR / f"{domain}.txt").read_text(encoding="utf-8")


class ShapeConfig(Protocol):
    """What io_spec needs of a model config (models.config.GemmaConfig has it)."""

    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    cache_layers: tuple[int, ...]  # the layers that own a cache entry, in order

    def kv_heads_for(self, layer: int) -> int: ...
    def head_dim_for(self, layer: int) -> int: ...
    def kv_source(self, layer: int) -> int: ...
    def cache_window(self, layer: int) -> int | None: ...


# How many positions an entry holds: every position so far, or (a window entry) at least
# the newest `keep` of them; the graph reads either exactly.
LENGTH_FULL = "full"
LENGTH_WINDOW = "window"


@dataclass(frozen=True)
class KVEntry:
    """One past_key_values.{index}.key / .value pair and its present.* outputs."""

    index: int
    layers: tuple[int, ...]  # the layers that attend over it; the first one writes it
    kv_heads: int
    head_dim: int
    length: str = LENGTH_FULL
    keep: int | None = None  # a window entry: the newest positions it must hold

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{self.index}.key", f"{prefix}.{self.index}.value"]


def kv_entries(cfg: ShapeConfig, windows: bool = False) -> list[KVEntry]:
    """The cache as data: one entry per layer that computes K/V, listing the KV-shared
    layers that read it too. `windows`: sliding layers' entries are window entries (the
    concat layout of a graph that masks them by their own length)."""
    readers: dict[int, list[int]] = {i: [i] for i in cfg.cache_layers}
    for j in range(cfg.num_hidden_layers):
        if cfg.kv_source(j) != j:
            readers[cfg.kv_source(j)].append(j)
    out = []
    for n, i in enumerate(cfg.cache_layers):
        keep = cfg.cache_window(i) if windows else None
        out.append(KVEntry(n, tuple(readers[i]), cfg.kv_heads_for(i), cfg.head_dim_for(i),
                           LENGTH_FULL if keep is None else LENGTH_WINDOW, keep))
    return out


def entries_from_io(io: dict[str, Any]) -> list[KVEntry]:
    """The cache entries an io_spec (a manifest's `io`) describes, in input order; what
    the runtime allocates. Entries written before `layers` existed are one layer each."""
    out = []
    for name, spec in io["inputs"].items():
        if name.startswith(PAST_PREFIX + ".") and name.endswith(".key"):
            index = int(name[len(PAST_PREFIX) + 1:-len(".key")])
            shape = spec["shape"]
            length = spec.get("length", LENGTH_FULL)
            if length not in (LENGTH_FULL, LENGTH_WINDOW):
                raise ValueError(f"{name}: unknown length {length!r}")
            keep = int(spec["keep"]) if length == LENGTH_WINDOW else None
            if keep is not None and keep < 1:
                raise ValueError(f"{name}: keep {keep} < 1")
            out.append(KVEntry(index, tuple(spec.get("layers", [index])), int(shape[1]), int(shape[3]),
                               length, keep))
    return out


def kv_names(entries: list[KVEntry], prefix: str) -> list[str]:
    """past_key_values.{i}.key / .value (or present.*), entry by entry."""
    return [n for e in entries for n in e.names(prefix)]


def input_names(cfg: ShapeConfig) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + kv_names(kv_entries(cfg), PAST_PREFIX)


def output_names(cfg: ShapeConfig) -> list[str]:
    return [LOGITS] + kv_names(kv_entries(cfg), PRESENT_PREFIX)


def io_spec(cfg: ShapeConfig, kv_dtype: str = "float32", logits_dtype: str = "float32",
            kv_cache: KVLayout | str = KVLayout.CONCAT) -> dict[str, Any]:
    """The I/O contract as data: {"inputs"|"outputs": {name: {"dtype", "shape"[, "default"]}}}.
    Written to the manifest and checked against the graph by the tests, so it cannot drift."""
    layout = KVLayout(kv_cache)
    past_len = PAST if layout == KVLayout.CONCAT else CAPACITY
    total_len = TOTAL if layout == KVLayout.CONCAT else CAPACITY
    entries = kv_entries(cfg, windows=layout == KVLayout.CONCAT)
    # Gemma 1-3 (one entry per layer, one shape): the entries carry nothing beyond the
    # name, so their io_spec stays what it always was. Otherwise each entry says its layers.
    plain = [e.layers for e in entries] == [(i,) for i in range(cfg.num_hidden_layers)]

    def kv(e: KVEntry, length: str) -> dict[str, Any]:
        d = {"dtype": kv_dtype, "shape": [BATCH, e.kv_heads, length, e.head_dim]}
        if e.length == LENGTH_WINDOW:
            d |= {"length": LENGTH_WINDOW, "keep": e.keep}
        return d if plain else d | {"layers": list(e.layers)}

    inputs = {
        INPUT_IDS: {"dtype": "int64", "shape": [BATCH, SEQ]},
        ATTENTION_MASK: {"dtype": "int64", "shape": [BATCH, TOTAL]},
        POSITION_IDS: {"dtype": "int64", "shape": [BATCH, SEQ]},
        **{n: kv(e, past_len) for e in entries for n in e.names(PAST_PREFIX)},
        KEEP_INPUT: {"dtype": "int64", "shape": [], "default": 0},  # optional
    }
    outputs = {
        LOGITS: {"dtype": logits_dtype, "shape": [BATCH, SEQ, cfg.vocab_size]},
        **{n: kv(e, total_len) for e in entries for n in e.names(PRESENT_PREFIX)},
    }
    return {"inputs": inputs, "outputs": outputs}
