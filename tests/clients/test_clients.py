"""The real 270M artifacts (fp32, int8) open unchanged in three other runtimes, each run by its
own code as its users install it (scripts/peer_clients.sh): onnxruntime-genai (the project venv),
Optimum's ORTModelForCausalLM (its own venv: it pins transformers < 4.58) and transformers.js
(Node). Each client script (beside this file) reads the artifact folder with nothing of ours.

The oracle is transformers (the GGUF loaded by transformers itself, fixture `hf_real`):
- tokenizer: each client's ids for the multilingual test text equal transformers' ids, and its
  chat template gives the ids of transformers' tokenizer on our format_chat string;
- fp32: each client's greedy tokens equal transformers' greedy tokens (MAX_NEW tokens, per chat);
- int8 is a different model (8-bit weights, int8-quantized activations in MatMulNBits), so its
  greedy stream may leave fp32's where two candidates are close: the first INT8_PREFIX tokens must
  equal transformers' (a broken cache, position or mask contract fails by the first or second),
  and genai and Optimum, which run ONNX Runtime 1.32 like our runtime, must give exactly our
  runtime's tokens on the graph each of them runs (genai the fused shared-cache model.onnx,
  Optimum the portable onnx/model_quantized.onnx). transformers.js ships onnxruntime-node 1.30,
  whose integer kernels round differently; the prefix check is what holds for it.

A client that cannot be installed fails here with the installer's reason (no skip).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemma_export.runtime.manifest import Manifest
from gemma_export.runtime.tokenizer import format_chat
from tests.runtime.test_tokenizer import CORPUS as TEXTS

pytestmark = pytest.mark.real

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
MAX_NEW = 24
INT8_PREFIX = 8
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "Answer in Korean."}, {"role": "user", "content": "안녕하세요! 2+2는?"}],
]
CLIENTS = ["onnxruntime-genai", "optimum", "transformers.js"]
PRECISIONS = ["fp32", "int8"]


def _texts(client: str) -> dict[str, str]:
    # genai's tokenizer API takes C strings: a NUL ends the text (the only difference found).
    if client == "onnxruntime-genai":
        return {k: v.replace("\x00", "") for k, v in TEXTS.items()}
    return dict(TEXTS)


def _cut(ids: list[int], eos: set[int]) -> list[int]:
    """New tokens up to (not including) the first end-of-sequence id, at most MAX_NEW."""
    out = []
    for t in ids[:MAX_NEW]:
        if t in eos:
            break
        out.append(t)
    return out


@pytest.fixture(scope="session")
def artifacts(real_artifact, tmp_path_factory) -> dict[str, Path]:
    from gemma_export.exporter.pipeline import quantize_artifact

    fp32 = real_artifact[0]
    int8 = tmp_path_factory.mktemp("clients") / "gemma3-270m-int8"
    quantize_artifact(fp32, int8, precision="int8", verify=False)  # int8 parity: tests/exporter
    return {"fp32": fp32, "int8": int8}


@pytest.fixture(scope="session")
def reference(hf_real) -> dict:
    """transformers' tokenizer ids and greedy tokens, and the eos ids every stream stops at."""
    import torch

    model, tok = hf_real
    eos = [1, tok.convert_tokens_to_ids("<end_of_turn>")]
    chat_ids = [tok(format_chat(m))["input_ids"] for m in CHATS]
    greedy = []
    with torch.no_grad():
        for ids in chat_ids:
            x = torch.tensor([ids])
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=eos, pad_token_id=0)
            greedy.append(_cut(out[0, len(ids):].tolist(), set(eos)))
    texts = {client: {k: tok(v)["input_ids"] for k, v in _texts(client).items()} for client in CLIENTS}
    return {"eos": eos, "chat_ids": chat_ids, "greedy": greedy, "texts": texts}


_RUNS: dict[tuple[str, str], dict] = {}


@pytest.fixture
def run(peers, artifacts, reference, tmp_path):
    """run(client, precision) -> the client's JSON answer (each pair runs once per session)."""

    def _run(client: str, precision: str) -> dict:
        key = (client, precision)
        if key in _RUNS:
            return _RUNS[key]
        art = artifacts[precision]
        graph = Manifest.read(art).clients[client]
        req = {"artifact": str(art), "texts": list(_texts(client).values()), "chats": CHATS,
               "max_new_tokens": MAX_NEW, "eos_token_ids": reference["eos"]}
        if client == "optimum":
            sub, name = graph["graph"].split("/", 1)
            req["optimum"] = {"subfolder": sub, "file_name": name}
        (tmp_path / "req.json").write_text(json.dumps(req))
        out = tmp_path / "out.json"
        cmd = {
            "onnxruntime-genai": [sys.executable, str(HERE / "genai_client.py")],
            "optimum": [peers["optimum"], str(HERE / "optimum_client.py")],
            "transformers.js": ["node", str(HERE / "tfjs_client.mjs")],
        }[client] + [str(tmp_path / "req.json"), str(out)] + ([peers["tfjs"]] if client == "transformers.js" else [])
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, f"{client} on {precision} failed: {p.stderr.strip()[-2000:]}"
        _RUNS[key] = json.loads(out.read_text())
        return _RUNS[key]

    return _run


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("client", CLIENTS)
def test_client_tokenizer_ids_equal_transformers(run, reference, client, precision):
    got = run(client, precision)
    want = reference["texts"][client]
    bad = [name for name, ids in zip(want, got["text_ids"]) if ids != want[name]]
    assert not bad, f"{client}: ids differ from transformers' on {bad}"
    assert got["chat_ids"] == reference["chat_ids"], f"{client}: chat template ids differ"


@pytest.mark.parametrize("client", CLIENTS)
def test_client_greedy_fp32_equals_transformers(run, reference, client):
    got = [_cut(g, set(reference["eos"])) for g in run(client, "fp32")["greedy"]]
    assert got == reference["greedy"]


def _agree(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("client", CLIENTS)
def test_client_greedy_int8(run, reference, artifacts, client):
    got = [_cut(g, set(reference["eos"])) for g in run(client, "int8")["greedy"]]
    prefix = [_agree(g, r) for g, r in zip(got, reference["greedy"])]
    want = [min(INT8_PREFIX, len(r)) for r in reference["greedy"]]
    lengths = [len(r) for r in reference["greedy"]]
    print(f"{client} int8: greedy agrees with transformers fp32 for {prefix} of {lengths} tokens")
    assert all(p >= w for p, w in zip(prefix, want)), f"{client} int8: agrees with transformers for {prefix} tokens"
    if client == "transformers.js":
        return
    from gemma_export.runtime.generate import SamplingConfig, generate_ids
    from gemma_export.runtime.session import DecoderSession

    sess = DecoderSession(artifacts["int8"], provider="cpu", portable=client == "optimum")
    cfg = SamplingConfig(max_new_tokens=MAX_NEW)
    ours = [generate_ids(sess, [ids], cfg).tokens[0] for ids in reference["chat_ids"]]
    assert got == ours, f"{client} int8 differs from our runtime on the same graph"
