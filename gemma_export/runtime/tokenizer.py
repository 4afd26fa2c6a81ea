"""Gemma's tokenizer on SentencePiece, with no torch: build, encode, decode, stream, chat.

An artifact carries a real SentencePiece `tokenizer.model`. Hugging Face directories ship one;
a GGUF does not, so `build_sentencepiece_model` rebuilds it from the vocabulary the GGUF stores
(`tokenizer.ggml.tokens`, `.scores`, `.token_type`), undoing what llama.cpp's converter changed:

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

The chat format is Gemma 3's chat template (tokenizer_config.json of google/gemma-3-*-it):
    <start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n
BOS is not written into the string; `Tokenizer.encode` adds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_export.errors import ArtifactError, RuntimeConfigError

__all__ = [
    "GGUFTokenType",
    "StreamDecoder",
    "Tokenizer",
    "build_sentencepiece_model",
    "chat_prompt",
    "format_chat",
]

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
            byte = _byte_of_piece(piece)
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
        _load_processor(data)
    except RuntimeError as exc:
        raise ValueError(f"SentencePiece rejects the model: {_first_line(exc)}") from exc
    return data


def _byte_of_piece(piece: str) -> int | None:
    """0xE2 for "<0xE2>"; None for anything else."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def _first_line(exc: BaseException) -> str:
    """SentencePiece's error as one readable line."""
    text = str(exc).strip()
    if "ParseFromArray" in text:
        # SentencePiece reports a protobuf that does not parse as a C++ source location.
        return "the bytes are not a serialized ModelProto"
    text = text.splitlines()[0] if text else type(exc).__name__
    return text.removeprefix("INTERNAL: ")


def _load_processor(data: bytes) -> spm.SentencePieceProcessor:
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(data)
    return processor


class Tokenizer:
    """Text <-> token ids with a SentencePiece model. Build with `from_file` or `from_bytes`."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str):
        self._sp = processor
        self.source = source
        # SentencePiece reports -1 for a special piece it cannot find or that is not CONTROL.
        for name in ("bos_id", "eos_id", "pad_id"):
            if getattr(processor, name)() < 0:
                raise ArtifactError(f"{source}: the tokenizer has no {name[:3]} control token")

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot read the tokenizer ({exc.strerror or exc})") from exc
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<tokenizer bytes>") -> Tokenizer:
        try:
            processor = _load_processor(data)
        except (RuntimeError, TypeError) as exc:
            raise ArtifactError(f"{source}: not a SentencePiece model ({_first_line(exc)})") from exc
        return cls(processor, source)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`, or the unk id when the vocabulary has no such piece."""
        return self._sp.piece_to_id(piece)

    def is_control(self, token_id: int) -> bool:
        """True for <bos>, <eos>, <pad>: tokens that are never printed."""
        return self._sp.is_control(int(token_id))

    def byte_value(self, token_id: int) -> int | None:
        """0xE2 for the byte-fallback token <0xE2>; None for any other token."""
        if not self._sp.is_byte(int(token_id)):
            return None
        return _byte_of_piece(self._sp.id_to_piece(int(token_id)))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`; control tokens print nothing, a broken UTF-8 byte run prints U+FFFD.

        Raises IndexError for an id outside the vocabulary.
        """
        return self._sp.decode([int(i) for i in ids])

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Decodes ids one at a time for streaming output.

    Text is released only where the ids can be cut without changing `decode`: never inside a
    multi-byte character spelled in byte-fallback tokens (<0xF0><0x9F><0x98><0x80> is one emoji).
    A byte run that is a complete, valid UTF-8 prefix is released at once; an incomplete or
    invalid one waits until the run ends (a non-byte token) or `flush`, so that
    "".join(pushes) + flush() == tokenizer.decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._pending: list[int] = []  # ids not yet turned into text
        self._run = bytearray()  # the byte-fallback run at the end of _pending

    def push(self, token_id: int) -> str:
        """Adds one id; returns the text that became printable ("" while a character is open)."""
        token_id = int(token_id)
        self._pending.append(token_id)
        byte = self._tokenizer.byte_value(token_id)
        if byte is not None:
            self._run.append(byte)
            try:
                self._run.decode("utf-8")  # strict: an incomplete character fails too
            except UnicodeDecodeError:
                return ""
        return self.flush()

    def flush(self) -> str:
        """Returns whatever is held (a cut-off character becomes U+FFFD, as `decode` would)."""
        if not self._pending:
            return ""
        text = self._tokenizer.decode(self._pending)
        self._pending.clear()
        self._run.clear()
        return text


# Gemma 3's chat template, as code (google/gemma-3-*-it tokenizer_config.json).
_ROLES = {"user": "user", "assistant": "model", "model": "model"}


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """A conversation in Gemma's turn format, without BOS (encode adds it).

    `messages` are {"role": "system" | "user" | "assistant", "content": str}. Like Gemma's
    template: an optional system message first is prepended to the first user turn with a blank
    line; then roles alternate user/assistant starting with user; contents are stripped
    (the template's `| trim`); "assistant" is written "model". With `add_generation_prompt`
    the string ends with an open model turn for the reply.
    """
    if not messages:
        raise RuntimeConfigError("the conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RuntimeConfigError(f"message {i} is not a {{'role': ..., 'content': str}} dict")
    prefix = ""
    turns = list(messages)
    if turns[0].get("role") == "system":
        prefix = turns.pop(0)["content"] + "\n\n"
    if not turns:
        raise RuntimeConfigError("the conversation has a system message but no user message")
    parts = []
    for i, message in enumerate(turns):
        role = _ROLES.get(message.get("role"))
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            raise RuntimeConfigError(
                f"message roles must alternate user/assistant starting with user; got {message.get('role')!r} "
                f"where {'user' if expected == 'user' else 'assistant'} belongs"
            )
        text = (prefix if i == 0 else "") + message["content"].strip()
        parts.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def chat_prompt(user: str) -> str:
    """One user turn and the open model turn: the prompt for a single question."""
    return format_chat([{"role": "user", "content": user}])
