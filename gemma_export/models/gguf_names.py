"""The one table from GGUF tensor names (llama.cpp's converter) to checkpoint names.

    checkpoint_name("blk.3.attn_q.weight", sandwich_norms=True) -> "model.layers.3.self_attn.q_proj.weight"
    checkpoint_name("blk.3.inp_gate.weight", True, gemma4=True) -> "model.layers.3.per_layer_input_gate.weight"
    gguf_name("model.layers.3.self_attn.q_proj.weight")          -> "blk.3.attn_q.weight"

Gemma 4 (llama.cpp's `gemma4` architecture, its converter's Gemma4Model) adds the per-layer
embedding, the layer scalar and the MoE block; a few of its tensors are not `.weight`
(the router's scales) or are not a checkpoint weight at all (rope_freqs: the converter's
encoding of proportional RoPE, read by models/load.py for the rotated fraction).

models/load.py reads a GGUF through `checkpoint_name`; the gguf recipe (exporter/quantize.py)
finds a weight's blocks in the file through `gguf_name`. Both read the tables below.
"""

from __future__ import annotations

import re

# Tensors outside the layers.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
# blk.{i}.<key>.weight -> model.layers.{i}.<value>.weight
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # ffn_norm is the pre-MLP norm, whose checkpoint name depends on the family: see below
}
# Gemma 4's own tensors (every other name as above; its norms are stored as they are).
GEMMA4_GLOBAL_NAMES = {
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
# blk.{i}.<key> -> model.layers.{i}.<value> (whole suffixes: some are not `.weight`)
GEMMA4_LAYER_NAMES = {
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_up_exps.weight": "experts.gate_up_proj",
    "ffn_down_exps.weight": "experts.down_proj",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
}
GEMMA4_ROPE_FREQS = "rope_freqs.weight"

# The pre-MLP norm: Gemma 2/3 (sandwich norms) call it pre_feedforward_layernorm, Gemma 1
# post_attention_layernorm (see models/gemma.py).
PRE_MLP_NORM = "ffn_norm"


def checkpoint_name(name: str, sandwich_norms: bool, gemma4: bool = False) -> str | None:
    """The checkpoint name of GGUF tensor `name`; None for a tensor we do not know."""
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    if gemma4:
        if name in GEMMA4_GLOBAL_NAMES:
            return GEMMA4_GLOBAL_NAMES[name]
        m = re.fullmatch(r"blk\.(\d+)\.(\w+\.\w+)", name)
        if m and m.group(2) in GEMMA4_LAYER_NAMES:
            return f"model.layers.{m.group(1)}.{GEMMA4_LAYER_NAMES[m.group(2)]}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m:
        return None
    i, part = m.groups()
    if part == PRE_MLP_NORM:
        hf = "pre_feedforward_layernorm" if sandwich_norms else "post_attention_layernorm"
    else:
        hf = LAYER_NAMES.get(part)
        if hf is None:
            return None
    return f"model.layers.{i}.{hf}.weight"


# post_attention_layernorm is left out: Gemma 1 stores it as ffn_norm, Gemma 2/3 as
# post_attention_norm, and the name alone does not say which family it is.
_TO_GGUF = {hf: part for part, hf in LAYER_NAMES.items() if hf != "post_attention_layernorm"}
_TO_GGUF_GLOBAL = {hf: name for name, hf in (GLOBAL_NAMES | GEMMA4_GLOBAL_NAMES).items()}
_TO_GGUF_GEMMA4 = {hf: part for part, hf in GEMMA4_LAYER_NAMES.items()}


def gguf_name(name: str) -> str | None:
    """The GGUF tensor holding checkpoint weight `name`; None where the table has none
    or the answer depends on the family (see _TO_GGUF)."""
    if name in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _TO_GGUF_GEMMA4:
        return f"blk.{m.group(1)}.{_TO_GGUF_GEMMA4[m.group(2)]}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    if m and m.group(2) in _TO_GGUF:
        return f"blk.{m.group(1)}.{_TO_GGUF[m.group(2)]}.weight"
    return None
