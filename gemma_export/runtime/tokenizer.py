"""Gemma's tokenizer on SentencePiece, with no torch: encode, decode, stream, chat.

An artifact carries a real SentencePiece `tokenizer.model` (where it comes from, a GGUF's
vocabulary included: exporter/tokenizer_source.py). This module loads it and owns what a
deployment needs: ids <-> text, a stream decoder that never splits a UTF-8 character, and
the chat format.

The chat format is the model family's chat template, as data (ChatFormat):
    Gemma 1-3 (tokenizer_config.json of google/gemma-3-*-it):
        <start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n
    Gemma 4 (chat_template.jinja of google/gemma-4-E2B-it; a system turn of its own):
        <|turn>system\\n{system}<turn|>\\n<|turn>user\\n{user}<turn|>\\n<|turn>model\\n
BOS is not written into the string; `Tokenizer.encode` adds it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import sentencepiece as spm

from gemma_export.errors import ArtifactError, RuntimeConfigError

__all__ = [
    "ChatFormat",
    "StreamDecoder",
    "Tokenizer",
    "chat_format",
    "chat_prompt",
    "format_chat",
]


def byte_of_piece(piece: str) -> int | None:
    """0xE2 for "<0xE2>"; None for anything else."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return int(piece[3:5], 16)
        except ValueError:
            return None
    return None


def first_line(exc: BaseException) -> str:
    """SentencePiece's error as one readable line."""
    text = str(exc).strip()
    if "ParseFromArray" in text:
        # SentencePiece reports a protobuf that does not parse as a C++ source location.
        return "the bytes are not a serialized ModelProto"
    text = text.splitlines()[0] if text else type(exc).__name__
    return text.removeprefix("INTERNAL: ")


def load_processor(data: bytes) -> spm.SentencePieceProcessor:
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
            processor = load_processor(data)
        except (RuntimeError, TypeError) as exc:
            raise ArtifactError(f"{source}: not a SentencePiece model ({first_line(exc)})") from exc
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
        return byte_of_piece(self._sp.id_to_piece(int(token_id)))

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


@dataclass(frozen=True)
class ChatFormat:
    """A family's turn markup: `start` + role + newline, the text, `end` + newline."""

    start: str  # opens a turn; the role name follows
    end: str  # closes a turn (the instruction-tuned models' end-of-turn eos id)
    system_turn: bool  # system text gets a turn of its own, else it opens the first user turn


# Gemma 1-3: google/gemma-3-*-it tokenizer_config.json's chat_template, as code.
GEMMA_CHAT = ChatFormat("<start_of_turn>", "<end_of_turn>", system_turn=False)
# Gemma 4: google/gemma-4-E2B-it chat_template.jinja, text only, thinking off: a system
# message first becomes `<|turn>system` ... `<turn|>`; the generation prompt is
# the bare `<|turn>model\n` that E2B's and E4B's templates write.
GEMMA4_CHAT = ChatFormat("<|turn>", "<turn|>", system_turn=True)


def chat_format(family: int | None) -> ChatFormat:
    """The chat format of a Gemma generation (a manifest's config["family"])."""
    return GEMMA4_CHAT if family is not None and int(family) >= 4 else GEMMA_CHAT


_ROLES = {"user": "user", "assistant": "model", "model": "model"}


def format_chat(messages: Sequence[dict], add_generation_prompt: bool = True,
                fmt: ChatFormat = GEMMA_CHAT) -> str:
    """A conversation in Gemma's turn format (`fmt`: Gemma 1-3 unless given), without BOS
    (encode adds it).

    `messages` are {"role": "system" | "user" | "assistant", "content": str}. Like Gemma's
    templates: an optional system message first is prepended to the first user turn with a
    blank line (Gemma 4: written as a system turn of its own); then roles alternate
    user/assistant starting with user; contents are stripped (the templates' `| trim`);
    "assistant" is written "model". With `add_generation_prompt` the string ends with an
    open model turn for the reply.
    """
    if not messages:
        raise RuntimeConfigError("the conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RuntimeConfigError(f"message {i} is not a {{'role': ..., 'content': str}} dict")
    parts, prefix = [], ""
    turns = list(messages)
    if turns[0].get("role") == "system":
        system = turns.pop(0)["content"]
        if fmt.system_turn:
            parts.append(f"{fmt.start}system\n{system.strip()}{fmt.end}\n")
        else:
            prefix = system + "\n\n"
    if not turns:
        raise RuntimeConfigError("the conversation has a system message but no user message")
    for i, message in enumerate(turns):
        role = _ROLES.get(message.get("role"))
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            raise RuntimeConfigError(
                f"message roles must alternate user/assistant starting with user; got {message.get('role')!r} "
                f"where {'user' if expected == 'user' else 'assistant'} belongs"
            )
        text = (prefix if i == 0 else "") + message["content"].strip()
        parts.append(f"{fmt.start}{role}\n{text}{fmt.end}\n")
    if add_generation_prompt:
        parts.append(f"{fmt.start}model\n")
    return "".join(parts)


def chat_prompt(user: str, fmt: ChatFormat = GEMMA_CHAT) -> str:
    """One user turn and the open model turn: the prompt for a single question."""
    return format_chat([{"role": "user", "content": user}], fmt=fmt)
