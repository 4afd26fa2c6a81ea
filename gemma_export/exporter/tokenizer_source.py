"""Where an artifact's `tokenizer.model` comes from: a Hugging Face directory, a GGUF, or a
preset's small byte-level vocabulary.

A Hugging Face directory ships SentencePiece's `tokenizer.model`; we copy its bytes. A GGUF only
stores the vocabulary as metadata (`tokenizer.ggml.*`), so we read it with `gguf.GGUFReader` and
`build_sentencepiece_model` rebuilds the model from the vocabulary (`.tokens`, `.scores`,
`.token_type`), undoing what llama.cpp's converter changed:

    GGUF (llama.cpp)                         SentencePiece model rebuilt here
    whitespace runs spelled "  " (U+0020)    spelled "▁▁" (U+2581), as the text is escaped
    <unk> CONTROL                            UNKNOWN (SentencePiece needs exactly one)
    <start_of_turn>, <mask>, <unused0>, ...  USER_DEFINED: matched whole in text, as the
      CONTROL, score -1000                     Hugging Face tokenizer of the same file does
    <pad> <eos> <bos> CONTROL                CONTROL: never matched in text, never printed

The settings are Gemma's: BPE whose merge priority is the piece score, byte fallback for any
character outside the vocabulary, split_digits (a training flag; Gemma's vocabulary has no piece
of two ASCII digits), no normalization (no NFKC), no dummy prefix, no whitespace squeezing.

The oracle is `transformers`' tokenizer for the same GGUF (tests/runtime/test_tokenizer.py).
Two differences, both tested with explicit expectations: `<bos>`, `<eos>`, `<pad>`, `<unk>`
typed in text stay text (HF matches them as special tokens), and a run of more than 31 spaces
is cut longest-first, 31 + rest, as SentencePiece and llama.cpp do (HF rebuilds the space-run
pieces as BPE merges and cuts 32 spaces into 16 + 16).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_export.errors import CheckpointError
from gemma_export.runtime.tokenizer import byte_of_piece, first_line, load_processor

_Piece = sp_pb2.ModelProto.SentencePiece
# What SentencePiece's escaper turns every space into before matching pieces.
_SPACE_SYMBOL = "\u2581"


class GGUFTokenType:
    """llama.cpp's token types (`tokenizer.ggml.token_type`). They share SentencePiece's numbers."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_KNOWN_TYPES = {
    GGUFTokenType.NORMAL: _Piece.NORMAL,
    GGUFTokenType.UNKNOWN: _Piece.UNKNOWN,
    GGUFTokenType.CONTROL: _Piece.CONTROL,
    GGUFTokenType.USER_DEFINED: _Piece.USER_DEFINED,
    GGUFTokenType.UNUSED: _Piece.UNUSED,
    GGUFTokenType.BYTE: _Piece.BYTE,
}


def _sentencepiece_type(index: int, gguf_type: int, control_ids: set[int], unk_id: int) -> int:
    """The SentencePiece type of one GGUF token (see the module docstring for why)."""
    if index == unk_id:
        return _Piece.UNKNOWN
    if index in control_ids:
        return _Piece.CONTROL
    if gguf_type not in _KNOWN_TYPES:
        raise ValueError(f"token {index} has unknown GGUF token type {gguf_type}")
    if gguf_type == GGUFTokenType.UNKNOWN:
        raise ValueError(f"token {index} is a second unknown token (unk_id is {unk_id})")
    if gguf_type == GGUFTokenType.CONTROL:
        # llama.cpp makes every added token CONTROL, chat markup included; HF's tokenizer of the
        # same file matches them whole in text, which for SentencePiece means USER_DEFINED.
        return _Piece.USER_DEFINED
    return _KNOWN_TYPES[gguf_type]


def build_sentencepiece_model(
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    bos_id: int = 2,
    eos_id: int = 1,
    pad_id: int = 0,
    unk_id: int = 3,
) -> bytes:
    """A serialized SentencePiece ModelProto for a vocabulary as GGUF stores it.

    `types` are GGUF token types (`GGUFTokenType`). Raises ValueError when the vocabulary cannot
    make a valid model (lengths differ, ids out of range, duplicate or empty pieces, missing byte
    pieces); the caller knows which file it came from and says so.
    """
    n = len(pieces)
    if len(scores) != n or len(types) != n:
        raise ValueError(f"vocabulary lengths differ: {n} tokens, {len(scores)} scores, {len(types)} types")
    specials = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id, "unk_id": unk_id}
    for name, value in specials.items():
        if not 0 <= value < n:
            raise ValueError(f"{name} {value} is outside the vocabulary of {n} tokens")
    if len(set(specials.values())) != len(specials):
        raise ValueError(f"special token ids are not distinct: {specials}")

    model = sp_pb2.ModelProto()
    seen: dict[str, int] = {}
    has_byte = [False] * 256
    control_ids = {bos_id, eos_id, pad_id}
    for index, (piece, score, gguf_type) in enumerate(zip(pieces, scores, types)):
        if not piece:
            raise ValueError(f"token {index} is empty")
        # SentencePiece escapes every space to U+2581 before matching, so a piece holding a real
        # space could never match; llama.cpp wrote the whitespace-run tokens that way.
        piece = piece.replace(" ", _SPACE_SYMBOL)
        if piece in seen:
            raise ValueError(f"tokens {seen[piece]} and {index} are both {piece!r}")
        seen[piece] = index
        sp_type = _sentencepiece_type(index, int(gguf_type), control_ids, unk_id)
        if sp_type == _Piece.BYTE:
            byte = byte_of_piece(piece)
            if byte is None:
                raise ValueError(f"token {index} is typed BYTE but is {piece!r}, not <0xNN>")
            has_byte[byte] = True
        model.pieces.add(piece=piece, score=float(score), type=sp_type)
    if not all(has_byte):
        # Byte fallback needs all 256; without them an unseen character would become <unk>.
        raise ValueError(f"the vocabulary has {sum(has_byte)} of the 256 byte tokens <0x00>..<0xFF>")

    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, pad_id
    # SentencePiece finds bos/eos/pad/unk by these pieces, not by the ids above.
    trainer.unk_piece = model.pieces[unk_id].piece
    trainer.bos_piece = model.pieces[bos_id].piece
    trainer.eos_piece = model.pieces[eos_id].piece
    trainer.pad_piece = model.pieces[pad_id].piece
    # Decoding <unk> prints nothing, like every other special token (the default is " ⁇ ").
    trainer.unk_surface = ""

    normalizer = model.normalizer_spec
    normalizer.name = "identity"  # Gemma does not NFKC-normalize: "ｆｕｌｌ" and "①" stay as typed
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    data = model.SerializeToString()
    try:
        # Load it once so a bad vocabulary fails here, not in a deployment.
        load_processor(data)
    except RuntimeError as exc:
        raise ValueError(f"SentencePiece rejects the model: {first_line(exc)}") from exc
    return data


# llama.cpp's name for a SentencePiece vocabulary (as opposed to "gpt2" byte-level BPE, "t5", ...).
_SENTENCEPIECE_MODEL = "llama"
# Gemma 4's: the same kind of vocabulary (pieces with U+2581 for spaces, byte fallback), which
# llama.cpp's converter writes from tokenizer.json as tokens plus BPE merges, every score -1000.
_GEMMA4_MODEL = "gemma4"


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
    if model not in (_SENTENCEPIECE_MODEL, _GEMMA4_MODEL):
        raise CheckpointError(
            f"{path}: the GGUF's tokenizer is {model!r}, not a SentencePiece ({_SENTENCEPIECE_MODEL!r}) vocabulary"
        )
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if model == _GEMMA4_MODEL and scores is not None and types is not None:
        tokens, scores, types = _gemma4_vocabulary(reader, path, tokens, types)
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
            f"{path}: the GGUF's vocabulary adds a leading space (add_space_prefix); only Gemma's, without one, "
            "is supported"
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


def _gemma4_vocabulary(reader, path, tokens: list, types: list) -> tuple[list, list[float], list]:
    """Gemma 4's GGUF vocabulary as SentencePiece scores: a piece that merge r makes scores
    -(r + 1), so SentencePiece's BPE (highest-scoring merged piece first) merges in the file's
    order; the pieces no merge makes score 0. Tokens past the embedding's rows (the converter
    may append one, e.g. <mask>) can never be fed or produced, so they are left out."""
    merges = _field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError(f"{path}: the GGUF's gemma4 vocabulary has no tokenizer.ggml.merges")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    rows = int(emb.shape[1]) if emb is not None else len(tokens)
    tokens, types = list(tokens[:rows]), list(types[:rows])
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise CheckpointError(f"{path}: bad merge {merge!r} in tokenizer.ggml.merges")
        rank.setdefault(left + right, r)
    scores = [-float(rank[t] + 1) if t in rank and types[i] == GGUFTokenType.NORMAL else 0.0
              for i, t in enumerate(tokens)]
    return tokens, scores, types


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
# to end through text like real ones (ids 0..3 pad/eos/bos/unk, then the family's chat
# markup, the 256 byte tokens, then common English pieces; any remainder <unusedN>).
_PRESET_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
_PRESET_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an had they you were their one all we can her has there been if more when will"
).split()


def preset_tokenizer(vocab_size: int, family: int = 3) -> bytes | None:
    """tokenizer.model for a preset's vocabulary size (None if it cannot hold the bytes),
    with the turn markers of its family's chat format (Gemma 4: <|turn>, <turn|>)."""
    from gemma_export.runtime.tokenizer import chat_format

    T = GGUFTokenType
    fmt = chat_format(family)
    pieces = [*_PRESET_SPECIALS, fmt.start, fmt.end] + [f"<0x{i:02X}>" for i in range(256)]
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
