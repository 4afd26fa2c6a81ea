"""The Hugging Face tokenizer files of an artifact, built from its SentencePiece model.

Optimum, transformers.js and onnxruntime-genai read `tokenizer.json` (the `tokenizers`
library's format), `tokenizer_config.json` and `special_tokens_map.json`, not SentencePiece's
`tokenizer.model`. This module writes them from the artifact's own `tokenizer.model` (copied
from an HF directory or rebuilt from a GGUF vocabulary: tokenizer_source.py), so every client
gets the ids our runtime's SentencePiece tokenizer gives. The mapping:

    SentencePiece (Gemma)                        tokenizer.json
    BPE, merge priority = the merged piece's     model BPE: vocab = every piece by id, merges =
      score, byte fallback                         every split of a NORMAL piece into two pieces,
                                                   highest-scoring merged piece first; byte_fallback
    escape spaces to U+2581, nothing else        normalizer Replace(" " -> "▁"), no pre-tokenizer
    USER_DEFINED (markup, <unusedN>, runs of      added tokens matched whole in the normalized text
      spaces / tabs / newlines) matched whole,     (leftmost-longest, as SentencePiece's prefix
      longest first, before BPE                    matcher); special only for the chat markers
    CONTROL <pad> <eos> <bos>, UNKNOWN <unk>      special added tokens
    encode adds <bos>                            post-processor "<bos> $A"
    decode: "▁" -> " ", bytes joined             decoder Replace, ByteFallback, Fuse

This is the construction transformers' own converter uses for Gemma (its merges come from the
vocabulary and scores in the same way); the tests compare the ids against our SentencePiece
tokenizer on the multilingual test text (tests/exporter/test_hf_tokenizer.py). One difference
stays, as in Gemma's own tokenizer.json: `<bos>`, `<eos>`, `<pad>`, `<unk>` typed in text are
matched as special tokens here (the chat template writes `<bos>` as text), where SentencePiece
keeps them text.
"""

from __future__ import annotations

from typing import Any

from sentencepiece import sentencepiece_model_pb2 as sp_pb2

_Piece = sp_pb2.ModelProto.SentencePiece
_SPACE_SYMBOL = "\u2581"
# Added tokens that clients treat as special (skipped when decoding with skip_special_tokens)
# besides the CONTROL / UNKNOWN pieces: Gemma's turn markers (Gemma 1-3's, Gemma 4's), as in
# its own tokenizer files.
_SPECIAL_MARKUP = {3: ("<start_of_turn>", "<end_of_turn>"), 4: ("<|turn>", "<turn|>")}


def _markup(family: int) -> tuple[str, str]:
    return _SPECIAL_MARKUP[4 if family >= 4 else 3]

# What both families' templates do per message: roles must alternate, `assistant` is written
# `model` (_TURN_ROLE), and the content is a string or a list of text parts, trimmed (_TURN_CONTENT).
_TURN_ROLE = (
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'assistant') -%}"
    "{%- set role = \"model\" -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
)
_TURN_CONTENT = (
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception(\"Invalid content type\") }}"
    "{%- endif -%}"
)

# Gemma 3's chat template (google/gemma-3-*-it tokenizer_config.json), text-only: the same format
# runtime/tokenizer.format_chat writes (tests compare the two).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    + _TURN_ROLE +
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    + _TURN_CONTENT +
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# Gemma 4's chat template (google/gemma-4-E2B-it chat_template.jinja), text-only with thinking
# off: a first system message is a turn of its own; the same format runtime/tokenizer.format_chat
# writes with GEMMA4_CHAT (tests compare the two).
CHAT_TEMPLATE_GEMMA4 = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{{ '<|turn>system\n' + messages[0]['content'] | trim + '<turn|>\n' }}"
    "{%- else -%}"
    "{{ '<|turn>system\n' + messages[0]['content'][0]['text'] | trim + '<turn|>\n' }}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    + _TURN_ROLE +
    "{{ '<|turn>' + role + '\n' }}"
    + _TURN_CONTENT +
    "{{ '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|turn>model\n' }}"
    "{%- endif -%}"
)


def _proto(model_bytes: bytes) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return proto


def _merges(pieces: list[tuple[str, float, int]], vocab: dict[str, int]) -> list[list[str]]:
    """BPE merges: every way to split a NORMAL or USER_DEFINED piece into two pieces that
    SentencePiece can hold as symbols (NORMAL, USER_DEFINED, UNUSED).

    Order: merges into USER_DEFINED pieces first, then NORMAL ones by the merged piece's score,
    highest first (SentencePiece merges the highest-scoring pair first); ties by the parts' ids.
    SentencePiece matches USER_DEFINED pieces whole before any merge, and so does a client that
    honours `normalized` added tokens (`tokenizers`); onnxruntime-extensions (genai's tokenizer)
    matches added tokens in the raw text only, so a run of spaces ("▁▁▁" once escaped) reaches
    BPE, and ranking its merges first builds the same one piece for runs up to 31.
    """
    symbol_types = {_Piece.NORMAL, _Piece.USER_DEFINED, _Piece.UNUSED}
    symbols = {p for p, _, t in pieces if t in symbol_types}
    ranked = []
    for piece, score, kind in pieces:
        if kind not in (_Piece.NORMAL, _Piece.USER_DEFINED) or len(piece) < 2:
            continue
        first = 0 if kind == _Piece.USER_DEFINED else 1
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in symbols and right in symbols:
                ranked.append((first, -score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def tokenizer_json(model_bytes: bytes) -> dict[str, Any]:
    """tokenizer.json (the `tokenizers` library's serialization) for a Gemma SentencePiece model."""
    proto = _proto(model_bytes)
    trainer = proto.trainer_spec
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    added = []
    for i, (piece, _, kind) in enumerate(pieces):
        if kind in (_Piece.CONTROL, _Piece.UNKNOWN, _Piece.USER_DEFINED):
            special = kind != _Piece.USER_DEFINED or piece in _SPECIAL_MARKUP[3] + _SPECIAL_MARKUP[4]
            added.append({
                "id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                # A user-defined piece is matched after spaces become "▁" (runs of spaces are
                # pieces of "▁"), as SentencePiece matches it in the escaped text.
                "normalized": not special, "special": special,
            })
    bos = pieces[trainer.bos_id][0]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": _SPACE_SYMBOL},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [trainer.bos_id], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": _SPACE_SYMBOL}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": pieces[trainer.unk_id][0],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _merges(pieces, vocab),
        },
    }


def special_tokens(model_bytes: bytes) -> dict[str, str]:
    """{"bos_token": "<bos>", "eos_token": ..., "pad_token": ..., "unk_token": ...}."""
    proto = _proto(model_bytes)
    t = proto.trainer_spec
    return {name: proto.pieces[i].piece for name, i in
            [("bos_token", t.bos_id), ("eos_token", t.eos_id), ("pad_token", t.pad_id), ("unk_token", t.unk_id)]}


def tokenizer_config(model_bytes: bytes, max_length: int, family: int = 3) -> dict[str, Any]:
    """tokenizer_config.json: the special tokens, <bos> added by encode, the family's chat template."""
    return {
        "tokenizer_class": "GemmaTokenizer",
        **special_tokens(model_bytes),
        "add_bos_token": True,
        "add_eos_token": False,
        "additional_special_tokens": list(_markup(family)),
        "chat_template": CHAT_TEMPLATE_GEMMA4 if family >= 4 else CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": max_length,
        "padding_side": "left",
    }


def special_tokens_map(model_bytes: bytes, family: int = 3) -> dict[str, Any]:
    return {**special_tokens(model_bytes), "additional_special_tokens": list(_markup(family))}
