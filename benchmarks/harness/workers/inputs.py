"""What every system is fed, made in the dev venv with gemma-export: the prompt ids, and a
Hugging Face folder of our loader's fp32 weights for the peers that build from one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def task_prompt_ids(a: dict) -> dict:
    from gemma_export.exporter.tokenizer_source import tokenizer_from_gguf
    from gemma_export.models.load import bundled_gguf_path
    from gemma_export.runtime.bench import prompt_ids
    from gemma_export.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_bytes(tokenizer_from_gguf(bundled_gguf_path()))
    return {"ids": prompt_ids(tok, a["n"])}


def task_prep_hf(a: dict) -> dict:
    """A Hugging Face Gemma 3 text folder holding our loader's fp32 weights (dequantized from
    the GGUF, norms un-shifted), with the flat RoPE fields older readers expect."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from gemma_export.exporter.tokenizer_source import tokenizer_from_gguf
    from gemma_export.models.load import load_model

    out = Path(a["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ck = load_model(None)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in ck.model.state_dict().items()}
    # Tied head: readers that look for lm_head.weight find it (a copy: safetensors refuses
    # shared storage); transformers re-ties it to the embedding on load.
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = ck.config.to_hf_dict()
    cfg.pop("layer_types", None)  # with sliding_window_pattern, as in Gemma 3's released config
    cfg.update(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], rope_theta=ck.config.rope_theta,
        rope_local_base_freq=ck.config.rope_local_theta, rope_scaling=None, sliding_window_pattern=6,
        torch_dtype="float32", use_cache=True, final_logit_softcapping=None, attn_logit_softcapping=None,
        # strict config dataclasses (huggingface_hub 1.x+) reject 256.0 for an int field
        query_pre_attn_scalar=int(ck.config.query_pre_attn_scalar),
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    eos = cfg["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos, "pad_token_id": cfg["pad_token_id"],
         "do_sample": False}, indent=2))
    (out / "tokenizer.model").write_bytes(tokenizer_from_gguf(a["gguf"]))
    # tokenizer.json / tokenizer_config.json: transformers' own conversion of the GGUF vocabulary.
    gguf = Path(a["gguf"])
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok.save_pretrained(str(out))
    (out / ".complete").write_text("{}")
    return {"files": sorted(p.name for p in out.iterdir())}
