"""Optimum (ORTModelForCausalLM) reads an artifact as its users would, in its own venv
(optimum-onnx pins transformers < 4.58): `python optimum_client.py REQUEST OUT`.

REQUEST / OUT as in genai_client.py, plus REQUEST["optimum"] = {"subfolder", "file_name"}: the
concat-contract graph the manifest names for Optimum (the transformers.js folder's graph).
Tokenizer: transformers' AutoTokenizer on the artifact's tokenizer.json / tokenizer_config.json.
No gemma_export import.
"""

import json
import sys

import optimum
import torch
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer


def main(request_path: str, out_path: str) -> None:
    req = json.load(open(request_path))
    art = req["artifact"]
    tok = AutoTokenizer.from_pretrained(art)
    model = ORTModelForCausalLM.from_pretrained(art, **req["optimum"], use_cache=True)
    text_ids = [tok(t)["input_ids"] for t in req["texts"]]
    chat_ids, greedy = [], []
    for messages in req["chats"]:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        x = torch.tensor([ids])
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=req["max_new_tokens"],
                             do_sample=False, eos_token_id=req["eos_token_ids"], pad_token_id=tok.pad_token_id)
        chat_ids.append(ids)
        greedy.append(out[0, len(ids):].tolist())
    version = getattr(optimum, "__version__", None) or __import__("importlib.metadata").metadata.version("optimum-onnx")
    json.dump({"client": "optimum", "version": version, "text_ids": text_ids, "chat_ids": chat_ids,
               "greedy": greedy}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
