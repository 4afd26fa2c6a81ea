"""Where an artifact's `tokenizer.model` comes from: a Hugging Face directory or a GGUF.

A Hugging Face directory ships SentencePiece's `tokenizer.model`; we copy its bytes. A GGUF only
stores the vocabulary as metadata (`tokenizer.ggml.*`), so we read it with `gguf.GGUFReader` and
rebuild the model with `runtime.tokenizer.build_sentencepiece_model`, which documents what
llama.cpp changed and how it is undone.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemma_export.errors import CheckpointError
from gemma_export.runtime.tokenizer import build_sentencepiece_model

# llama.cpp's name for a SentencePiece vocabulary (as opposed to "gpt2" byte-level BPE, "t5", ...).
_SENTENCEPIECE_MODEL = "llama"


def _field(reader, key: str):
    """A metadata value, or None when the file does not have the key."""
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def tokenizer_from_gguf(path: str | os.PathLike) -> bytes:
    """A serialized SentencePiece model rebuilt from a GGUF's tokenizer metadata."""
    import gguf  # export-only dependency; imported here so the rest of the module needs none

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read the GGUF ({exc})") from exc

    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise CheckpointError(f"{path}: the GGUF has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    if model != _SENTENCEPIECE_MODEL:
        raise CheckpointError(
            f"{path}: the GGUF's tokenizer is {model!r}, not a SentencePiece ({_SENTENCEPIECE_MODEL!r}) vocabulary"
        )
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if scores is None or types is None:
        # BPE merge order comes from the scores, special tokens from the types: no guessing.
        raise CheckpointError(f"{path}: the GGUF's vocabulary lacks tokenizer.ggml.scores or .token_type")

    # llama.cpp assumes a dummy prefix for a SentencePiece vocabulary that does not say otherwise,
    # except for Gemma, whose converter has always written False.
    architecture = _field(reader, "general.architecture") or ""
    add_space_prefix = _field(reader, "tokenizer.ggml.add_space_prefix")
    if add_space_prefix is None:
        add_space_prefix = not architecture.startswith("gemma")
    if add_space_prefix:
        raise CheckpointError(
            f"{path}: the GGUF's vocabulary adds a leading space (add_space_prefix); only Gemma's, without one, is supported"
        )

    # Gemma's ids where the file is silent (pad 0, eos 1, bos 2, unk 3).
    ids = {}
    for name, key, default in [
        ("bos_id", "bos_token_id", 2),
        ("eos_id", "eos_token_id", 1),
        ("pad_id", "padding_token_id", 0),
        ("unk_id", "unknown_token_id", 3),
    ]:
        value = _field(reader, f"tokenizer.ggml.{key}")
        ids[name] = default if value is None else int(value)
    try:
        return build_sentencepiece_model(tokens, scores, types, **ids)
    except ValueError as exc:
        raise CheckpointError(f"{path}: bad tokenizer vocabulary: {exc}") from exc


def tokenizer_from_hf_dir(directory: str | os.PathLike) -> bytes | None:
    """The bytes of `directory/tokenizer.model`, or None when the directory has none."""
    path = Path(directory) / "tokenizer.model"
    if not path.is_file():
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc


# A small byte-level vocabulary for random-weight presets, so that tiny artifacts run end
# to end through text like real ones (ids 0..3 pad/eos/bos/unk, then the chat markup,
# the 256 byte tokens, then common English pieces; any remainder <unusedN>).
_PRESET_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
_PRESET_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an had they you were their one all we can her has there been if more when will"
).split()


def preset_tokenizer(vocab_size: int) -> bytes | None:
    """tokenizer.model for a preset's vocabulary size (None if it cannot hold the bytes)."""
    from gemma_export.runtime.tokenizer import GGUFTokenType as T

    pieces = list(_PRESET_SPECIALS) + [f"<0x{i:02X}>" for i in range(256)]
    types = [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN, T.CONTROL, T.CONTROL] + [T.BYTE] * 256
    if vocab_size < len(pieces):
        return None
    normal = ["\u2581"] + [chr(c) for c in range(33, 127)]
    normal += [f"\u2581{c}" for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    normal += [f"\u2581{w}" for w in _PRESET_WORDS]
    normal = normal[: vocab_size - len(pieces)]
    pieces += normal
    types += [T.NORMAL] * len(normal)
    pieces += [f"<unused{i}>" for i in range(vocab_size - len(pieces))]
    types += [T.USER_DEFINED] * (vocab_size - len(types))
    scores = [0.0 if t != T.NORMAL else -float(i) for i, t in enumerate(types)]
    return build_sentencepiece_model(pieces, scores, types)
