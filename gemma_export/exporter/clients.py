"""The files that let other runtimes open an artifact as it is: onnxruntime-genai, Optimum and
transformers.js. Written by export and quantize beside the artifact's own files.

    genai_config.json          onnxruntime-genai: graph, I/O names, heads, layers, ids, search
    tokenizer.json, tokenizer_config.json, special_tokens_map.json    (hf_tokenizer.py)
    config.json                + "transformers.js_config" (dtype, external data)
    onnx/model{suffix}.onnx    transformers.js and Optimum: the contract-exact graph
    onnx/model{suffix}.onnx_data   the artifact's one weights file, read by every graph

Which graph each client drives:
- genai runs its own C++ loop and binds one buffer per cache tensor as both past and present
  when `past_present_share_buffer` is on. That is exactly our shared-cache contract (the fused
  int8 / int4 / gguf graphs: GroupQueryAttention, new positions written in place, the total
  length read from attention_mask's width), so genai drives the fused model.onnx with the
  flag on, and the concat graphs (fp32, and narrow on the CPU graph) with it off.
- Optimum and transformers.js feed `past_key_values.*` of the past length and read `present.*`
  of the total: the concat contract. They get the portable graph (model.portable.onnx for
  the fused recipes, model.onnx otherwise), renamed into transformers.js's folder layout.
- All three keep every position of every layer (a uniform cache); the concat graph reads that
  exactly (contract.py: a window entry may be full). Bounding sliding layers is our runtime's.

transformers.js looks for `onnx/model{suffix}.onnx` with the suffix of a dtype and, where
`transformers.js_config.use_external_data_format` says so, `onnx/model{suffix}.onnx_data`; in
the browser it hands the data to ONNX Runtime under that bare name, so that graph must name it.
So the weights file itself moves there (the recipes write model.onnx.data; this is the last
step) and the top-level graphs read `onnx/model{suffix}.onnx_data`: one file, no copy. Not a
hard link (onnx.load refuses external data with a second link, a "hardlink attack"), not a
symlink (ONNX Runtime refuses external data that resolves outside the graph's folder).
bf16 has no transformers.js dtype: no onnx/ folder, the weights stay in model.onnx.data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gemma_export.contract import (
    ATTENTION_MASK, GENAI_CONFIG_FILE, INPUT_IDS, LOGITS, PAST_PREFIX, POSITION_IDS, PRESENT_PREFIX, TFJS_DIR,
    KVLayout, Precision,
)

# transformers.js dtype for each precision and the file suffix it loads (its
# DEFAULT_DTYPE_SUFFIX_MAPPING): our int8 is 8-bit block weights with fp32 activations, which is
# what its q8 (`_quantized`) graphs of decoder models are; int4 and the carried GGUF blocks are
# 4-bit-class MatMulNBits, its q4.
TFJS_DTYPES: dict[Precision, tuple[str, str]] = {
    Precision.FP32: ("fp32", ""),
    Precision.FP16: ("fp16", "_fp16"),
    Precision.INT8: ("q8", "_quantized"),
    Precision.INT4: ("q4", "_q4"),
    Precision.GGUF: ("q4", "_q4"),
}

# The manifest's `clients` keys (runtime/inspect.CLIENTS lists them in order).
GENAI, OPTIMUM, TFJS = "onnxruntime-genai", "optimum", "transformers.js"
# genai's model types per Gemma family: gemma, gemma2, gemma3_text (the decoder-only Gemma 3).
GENAI_TYPES = {1: "gemma", 2: "gemma2", 3: "gemma3_text"}


def genai_config(cfg, *, graph_file: str, shared_cache: bool, max_length: int) -> dict[str, Any]:
    """genai_config.json (the schema onnxruntime-genai's builder writes, models/builders/base.py)."""
    eos = list(cfg.eos_token_ids)
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id,
            "context_length": max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": graph_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": INPUT_IDS,
                    "attention_mask": ATTENTION_MASK,
                    "position_ids": POSITION_IDS,
                    "past_key_names": f"{PAST_PREFIX}.%d.key",
                    "past_value_names": f"{PAST_PREFIX}.%d.value",
                },
                "outputs": {
                    "logits": LOGITS,
                    "present_key_names": f"{PRESENT_PREFIX}.%d.key",
                    "present_value_names": f"{PRESENT_PREFIX}.%d.value",
                },
                "num_attention_heads": cfg.num_attention_heads,
                "num_hidden_layers": cfg.num_hidden_layers,
                "num_key_value_heads": cfg.num_key_value_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": cfg.pad_token_id,
            "type": GENAI_TYPES[cfg.family],
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": max_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": shared_cache,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def tfjs_config(precision: Precision) -> dict[str, Any] | None:
    """config.json's `transformers.js_config`: the dtype to load and its one external data file."""
    if precision not in TFJS_DTYPES:
        return None
    dtype, suffix = TFJS_DTYPES[precision]
    return {"dtype": dtype, "use_external_data_format": {f"model{suffix}.onnx": 1}}


def write_tfjs_layout(d: Path, precision: Precision, graph_file: str, data_file: str) -> dict[str, str] | None:
    """Move the weights into transformers.js's folder: data_file becomes
    onnx/model{suffix}.onnx_data, every top-level graph in `d` is pointed at it, and
    onnx/model{suffix}.onnx is graph_file pointed at it by its bare name (as transformers.js
    hands it to ONNX Runtime). The two paths, or None (nothing changed) for a precision
    transformers.js has no dtype for."""
    import onnx

    if precision not in TFJS_DTYPES:
        return None
    _, suffix = TFJS_DTYPES[precision]
    graph_name, data_name = f"model{suffix}.onnx", f"model{suffix}.onnx_data"
    (d / TFJS_DIR).mkdir(exist_ok=True)
    os.replace(d / data_file, d / TFJS_DIR / data_name)
    for top in sorted(d.glob("*.onnx")):
        proto = onnx.load(str(top), load_external_data=False)
        if _relocate(proto, data_file, f"{TFJS_DIR}/{data_name}", top.name):
            onnx.save(proto, str(top))
        if top.name == graph_file:
            _relocate(proto, f"{TFJS_DIR}/{data_name}", data_name, top.name)
            onnx.save(proto, str(d / TFJS_DIR / graph_name))
    return {"graph": f"{TFJS_DIR}/{graph_name}", "data": f"{TFJS_DIR}/{data_name}"}


def _relocate(proto, old: str, new: str, where: str) -> int:
    """Point every external tensor stored in `old` at `new`; how many were."""
    n = 0
    for init in _external_tensors(proto):
        for entry in init.external_data:
            if entry.key == "location":
                if entry.value != old:
                    raise ValueError(f"{where}: {init.name} is stored in {entry.value}, not {old}")
                entry.value = new
                n += 1
    return n


def _external_tensors(proto):
    """Every TensorProto of the graph (subgraphs included) whose data lives in a file."""
    from onnx.external_data_helper import _get_all_tensors

    return [t for t in _get_all_tensors(proto) if t.data_location == 1]  # TensorProto.EXTERNAL


def write_client_files(d: Path, cfg, *, precision: Precision, kv_cache: KVLayout, model_file: str,
                       portable_model_file: str | None, cpu_model_file: str | None, data_file: str,
                       max_length: int) -> tuple[dict[str, dict[str, str]], str]:
    """genai_config.json and the transformers.js layout in `d`. Returns the manifest's
    `clients` entry ({client: {role: path}} for the files each client reads) and where the
    weights file now is (the manifest's data_file)."""
    from gemma_export.runtime.manifest import write_json

    shared = kv_cache == KVLayout.SHARED
    genai_graph = model_file if shared else (cpu_model_file or model_file)
    clients = {}
    # genai's model types stop at Gemma 3, and its config has one cache per layer (Gemma 4's
    # KV-shared layers have none): no genai_config.json for Gemma 4.
    if cfg.family in GENAI_TYPES:
        write_json(d / GENAI_CONFIG_FILE, genai_config(cfg, graph_file=genai_graph, shared_cache=shared,
                                                       max_length=max_length))
        clients[GENAI] = {"config": GENAI_CONFIG_FILE, "graph": genai_graph}
    concat_graph = portable_model_file if shared else (cpu_model_file or model_file)
    tfjs = write_tfjs_layout(d, precision, concat_graph, data_file)
    if tfjs is None:
        return clients, data_file
    clients[TFJS] = {**tfjs, "dtype": TFJS_DTYPES[precision][0]}
    clients[OPTIMUM] = {"graph": tfjs["graph"]}
    return clients, tfjs["data"]
