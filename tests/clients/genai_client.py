"""onnxruntime-genai reads an artifact as its users would: `python genai_client.py REQUEST OUT`.

REQUEST (JSON): {"artifact", "texts": [str], "chats": [[{"role", "content"}]], "max_new_tokens"}.
OUT (JSON): {"client", "version", "text_ids": [[int]] (with <bos>), "chat_ids": [[int]],
"greedy": [[int]] (new tokens of genai's own C++ loop, greedy, per chat)}.
genai 0.18 encodes with add_special_tokens off (its design: the chat template writes <bos>), so
`text_ids` turns it on, as a user encoding raw text must; the chats go through its
apply_chat_template. No gemma_export import: genai alone reads the files.
"""

import json
import sys

import onnxruntime_genai as og


def main(request_path: str, out_path: str) -> None:
    req = json.load(open(request_path))
    model = og.Model(req["artifact"])
    chat_tok = og.Tokenizer(model)
    text_tok = og.Tokenizer(model)
    text_tok.update_options(add_special_tokens="true")
    text_ids = [[int(i) for i in text_tok.encode(t)] for t in req["texts"]]
    chat_ids, greedy = [], []
    for messages in req["chats"]:
        prompt = chat_tok.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        ids = [int(i) for i in chat_tok.encode(prompt)]
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + req["max_new_tokens"])
        gen = og.Generator(model, params)
        gen.append_tokens([ids])
        new = []
        while not gen.is_done():
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
        chat_ids.append(ids)
        greedy.append(new)
    json.dump({"client": "onnxruntime-genai", "version": og.__version__, "text_ids": text_ids,
               "chat_ids": chat_ids, "greedy": greedy}, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
