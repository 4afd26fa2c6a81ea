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
"""

from __future__ import annotations

import enum
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

# The tied input embedding / LM head: one initializer of this name in every traced graph.
EMBED_WEIGHT = "model.embed_tokens.weight"

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


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """past_key_values.{i}.key / .value (or present.*), layer by layer."""
    return [f"{prefix}.{i}.{t}" for i in range(num_layers) for t in ("key", "value")]


def input_names(cfg: ShapeConfig) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + kv_names(cfg.num_hidden_layers, PAST_PREFIX)


def output_names(cfg: ShapeConfig) -> list[str]:
    return [LOGITS] + kv_names(cfg.num_hidden_layers, PRESENT_PREFIX)


def io_spec(cfg: ShapeConfig, kv_dtype: str = "float32", logits_dtype: str = "float32",
            kv_cache: KVLayout | str = KVLayout.CONCAT) -> dict[str, Any]:
    """The I/O contract as data: {"inputs"|"outputs": {name: {"dtype", "shape"[, "default"]}}}.
    Written to the manifest and checked against the graph by the tests, so it cannot drift."""
    layout = KVLayout(kv_cache)
    kv_in = [BATCH, cfg.num_key_value_heads, PAST if layout == KVLayout.CONCAT else CAPACITY, cfg.head_dim]
    kv_out = [BATCH, cfg.num_key_value_heads, TOTAL if layout == KVLayout.CONCAT else CAPACITY, cfg.head_dim]
    inputs = {
        INPUT_IDS: ("int64", [BATCH, SEQ]),
        ATTENTION_MASK: ("int64", [BATCH, TOTAL]),
        POSITION_IDS: ("int64", [BATCH, SEQ]),
        **{n: (kv_dtype, kv_in) for n in kv_names(cfg.num_hidden_layers, PAST_PREFIX)},
    }
    optional = {KEEP_INPUT: ("int64", [], 0)}
    outputs = {
        LOGITS: (logits_dtype, [BATCH, SEQ, cfg.vocab_size]),
        **{n: (kv_dtype, kv_out) for n in kv_names(cfg.num_hidden_layers, PRESENT_PREFIX)},
    }
    return {
        "inputs": {k: {"dtype": d, "shape": s} for k, (d, s) in inputs.items()}
        | {k: {"dtype": d, "shape": s, "default": v} for k, (d, s, v) in optional.items()},
        "outputs": {k: {"dtype": d, "shape": s} for k, (d, s) in outputs.items()},
    }
