"""The loaders in models/load.py and config parsing in models/config.py.

Hugging Face directories are written by transformers' own `save_pretrained` (single file
and sharded with an index) and must load into logits equal to transformers' (fp32, max abs
diff <= 1e-4). Then the strictness contract: every bad input is a CheckpointError whose
message is one line naming the file or tensor at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gemma_export.errors import CheckpointError
from gemma_export.models.config import GemmaConfig, LayerType
from gemma_export.models.load import load_model, preset_config, random_weights

TOL = 1e-4
TINY = ("tiny-gemma1", "tiny-gemma2", "tiny-gemma3")


def hf_model(name: str, seed: int = 3):
    """A transformers model for a preset, with our seeded random weights (so norm weights
    are non-zero and (1 + w) is exercised; transformers initialises them to 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = preset_config(name)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg.to_hf_dict()), attn_implementation="eager")
    missing, unexpected = hf.load_state_dict(random_weights(cfg, seed), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    return hf.eval()


def max_logit_diff(ckpt, hf) -> float:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, ckpt.config.vocab_size, (2, 19), generator=g)  # longer than the window (8)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours, _ = ckpt.model(ids, mask, pos, ckpt.model.empty_cache(2))
    return (ours - ref).abs().max().item()


def write_checkpoint(d: Path, cfg: GemmaConfig, state: dict[str, torch.Tensor], hf_config: dict | None = None) -> Path:
    """A minimal HF directory (config.json + model.safetensors) without transformers."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf_config or cfg.to_hf_dict()))
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    return d


def check_error(exc_info, *needles: str) -> str:
    """The message is one line and names what it should."""
    msg = str(exc_info.value)
    assert "\n" not in msg, f"multi-line message: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# -- Hugging Face directories --------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name", TINY)
def test_hf_dir_round_trip(tmp_path, name, sharded):
    hf = hf_model(name)
    kw = {"max_shard_size": "40KB"} if sharded else {}
    hf.save_pretrained(tmp_path, **kw)
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    if sharded:
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1

    ckpt = load_model(str(tmp_path))
    assert ckpt.kind == "hf" and ckpt.path == tmp_path
    assert ckpt.config.model_type == hf.config.model_type
    assert ckpt.config.replace(name="") == preset_config(name).replace(name="")
    diff = max_logit_diff(ckpt, hf)
    assert diff <= TOL, f"max abs diff {diff:.3g}"


def test_config_json_path_loads_its_directory(tmp_path):
    hf = hf_model("tiny-gemma2")
    hf.save_pretrained(tmp_path)
    ckpt = load_model(str(tmp_path / "config.json"))
    assert ckpt.path == tmp_path
    assert max_logit_diff(ckpt, hf) <= TOL


# The multimodal Gemma 3 layout: transformers 5 (`model.language_model.`) and 4.x
# (`language_model.model.`); the vision tower and projector are skipped by name.
MULTIMODAL = {
    "transformers5": ("model.language_model.", "model.vision_tower.vision_model.embeddings.patch_embedding.weight",
                      "model.multi_modal_projector.mm_input_projection_weight"),
    "transformers4": ("language_model.model.", "vision_tower.vision_model.embeddings.patch_embedding.weight",
                      "multi_modal_projector.mm_input_projection_weight"),
}


@pytest.mark.parametrize("layout", sorted(MULTIMODAL))
def test_gemma3_multimodal_layout(tmp_path, layout):
    prefix, vision_key, projector_key = MULTIMODAL[layout]
    hf = hf_model("tiny-gemma3")
    cfg = preset_config("tiny-gemma3")
    state = {}
    for k, v in hf.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied: Google's checkpoints do not store it
        assert k.startswith("model.")
        state[prefix + k[len("model."):]] = v.clone()
    state[vision_key] = torch.randn(8, 3, 2, 2)
    state[projector_key] = torch.randn(8, cfg.hidden_size)
    text = cfg.to_hf_dict()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        text.pop(key)  # the multimodal config keeps these at the top level
    top = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
        "bos_token_id": 2,
        "eos_token_id": [1, 5],
        "pad_token_id": 0,
    }
    write_checkpoint(tmp_path, cfg, state, top)
    ckpt = load_model(str(tmp_path))
    assert ckpt.config.replace(name="") == cfg.replace(name="")
    assert max_logit_diff(ckpt, hf) <= TOL


def test_stored_lm_head_must_equal_embedding(tmp_path):
    cfg = preset_config("tiny-gemma1")
    state = random_weights(cfg)
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    write_checkpoint(tmp_path, cfg, state)
    load_model(str(tmp_path))  # equal: accepted
    state["lm_head.weight"][0, 0] += 1.0
    write_checkpoint(tmp_path, cfg, state)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path))
    check_error(e, str(tmp_path), "lm_head.weight")


# -- config parsing ---------------------------------------------------------------------------

_GEMMA3_BASE = {
    "model_type": "gemma3_text",
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "query_pre_attn_scalar": 16,
    "sliding_window": 8,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 1024,
    "eos_token_id": [1, 106],
}


def test_rope_parameters_and_flat_rope_fields_agree():
    flat = dict(
        _GEMMA3_BASE, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    )
    flat_old_key = dict(flat, rope_scaling={"type": "linear", "factor": 8.0})  # transformers < 4.45
    per_type = dict(
        _GEMMA3_BASE,
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    )
    parsed = [GemmaConfig.from_hf_dict(d, "x/config.json") for d in (flat, flat_old_key, per_type)]
    assert parsed[0] == parsed[1] == parsed[2]
    c = parsed[0]
    assert (c.rope_theta, c.rope_local_theta, c.rope_scaling_factor) == (1_000_000.0, 10_000.0, 8.0)
    assert c.layer_types == (LayerType.SLIDING,) * 5 + (LayerType.GLOBAL,)
    assert c.rope_scale_for(LayerType.SLIDING) == 1.0 and c.rope_scale_for(LayerType.GLOBAL) == 8.0


def test_rope_parameters_single_set_gemma2():
    base = {k: v for k, v in _GEMMA3_BASE.items() if k != "sliding_window_pattern"}
    base = dict(base, model_type="gemma2", num_hidden_layers=4, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0)
    flat = dict(base, rope_theta=20_000.0)
    new = dict(base, rope_parameters={"rope_type": "default", "rope_theta": 20_000.0})
    a, b = GemmaConfig.from_hf_dict(flat), GemmaConfig.from_hf_dict(new)
    assert a == b
    assert a.rope_theta == a.rope_local_theta == 20_000.0
    assert a.layer_types == (LayerType.SLIDING, LayerType.GLOBAL) * 2


@pytest.mark.parametrize("name", TINY)
def test_transformers_config_json_parses_to_preset(tmp_path, name):
    """What transformers 5 writes (rope_parameters, layer_types) parses back to the preset."""
    from transformers import AutoConfig

    AutoConfig.for_model(**preset_config(name).to_hf_dict()).save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())
    cfg = GemmaConfig.from_hf_file(tmp_path / "config.json")
    assert cfg.replace(name="") == preset_config(name).replace(name="")


def test_unknown_model_type_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(_GEMMA3_BASE, model_type="llama")))
    with pytest.raises(CheckpointError) as e:
        GemmaConfig.from_hf_file(path)
    check_error(e, str(path), "llama")


def test_unsupported_rope_type():
    d = dict(_GEMMA3_BASE, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError) as e:
        GemmaConfig.from_hf_dict(d, "x/config.json")
    check_error(e, "x/config.json", "yarn")


def test_malformed_config_values(tmp_path):
    d = {k: v for k, v in _GEMMA3_BASE.items() if k != "vocab_size"}
    with pytest.raises(CheckpointError) as e:
        GemmaConfig.from_hf_dict(d, "x/config.json")
    check_error(e, "x/config.json", "vocab_size")
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointError) as e:
        GemmaConfig.from_hf_file(path)
    check_error(e, str(path))


# -- strictness and bad input -------------------------------------------------------------------


@pytest.fixture
def good_dir(tmp_path):
    """A valid tiny Gemma 3 checkpoint directory written with safetensors only."""
    cfg = preset_config("tiny-gemma3")
    return write_checkpoint(tmp_path / "ckpt", cfg, random_weights(cfg))


def test_good_dir_loads(good_dir):
    ckpt = load_model(str(good_dir))
    assert ckpt.kind == "hf"


def test_nonexistent_path(tmp_path):
    p = tmp_path / "nope"
    with pytest.raises(CheckpointError) as e:
        load_model(str(p))
    check_error(e, str(p))


def test_dir_without_config(tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path))
    check_error(e, str(tmp_path), "config.json")


def test_dir_without_weights(good_dir):
    (good_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, str(good_dir), "safetensors")


def test_truncated_safetensors(good_dir):
    f = good_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, str(f))


def test_garbage_safetensors(good_dir):
    f = good_dir / "model.safetensors"
    f.write_bytes(b"\x89this is not a safetensors file\x00\xff" * 10)
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, str(f))


def test_missing_shard_named_in_index(tmp_path):
    hf_model("tiny-gemma1").save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path))
    check_error(e, str(shard))


def test_malformed_index(good_dir):
    (good_dir / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, "model.safetensors.index.json")


def _resave(d: Path, edit) -> None:
    f = d / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f))


def test_missing_tensor(good_dir):
    key = "model.layers.2.self_attn.k_norm.weight"
    _resave(good_dir, lambda s: s.pop(key))
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, str(good_dir), "missing", key)


def test_unexpected_tensor(good_dir):
    key = "model.layers.0.self_attn.q_proj.bias"
    _resave(good_dir, lambda s: s.__setitem__(key, torch.zeros(64)))
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, str(good_dir), "unexpected", key)


def test_several_missing_tensors_counted(good_dir):
    def drop(s):
        for k in [k for k in s if k.startswith("model.layers.5.")]:
            del s[k]

    _resave(good_dir, drop)
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, "missing tensor model.layers.5.", "more)")


def test_wrong_shape(good_dir):
    key = "model.layers.1.mlp.up_proj.weight"
    _resave(good_dir, lambda s: s.__setitem__(key, torch.zeros(127, 64)))
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, str(good_dir), key, "(127, 64)", "(128, 64)")


def test_config_of_another_architecture(good_dir):
    cfg_path = good_dir / "config.json"
    cfg_path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4}))
    with pytest.raises(CheckpointError) as e:
        load_model(str(good_dir))
    check_error(e, str(cfg_path), "llama")


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "llama.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    check_error(e, str(path), "llama")


def test_not_a_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + b"\x00" * 64)
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    check_error(e, str(path), "GGUF")


def test_file_of_unknown_kind(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError) as e:
        load_model(str(path))
    check_error(e, str(path))


def test_unknown_preset_lists_known_names():
    with pytest.raises(CheckpointError) as e:
        load_model("tiny-gemma9")
    check_error(e, "tiny-gemma9", "tiny-gemma1", "tiny-gemma3", "gemma3-270m")


def test_gguf_name_table_reads_both_ways():
    """models/load.py and the gguf recipe read one table: every name maps back to itself."""
    from gemma_export.models.gguf_names import GLOBAL_NAMES, LAYER_NAMES, checkpoint_name, gguf_name

    for g in [*GLOBAL_NAMES, *(f"blk.7.{part}.weight" for part in LAYER_NAMES)]:
        hf = checkpoint_name(g, sandwich_norms=True)
        assert hf is not None
        assert gguf_name(hf) in (g, None)  # None only where the family decides
    assert gguf_name("model.layers.7.self_attn.q_proj.weight") == "blk.7.attn_q.weight"
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("model.layers.7.post_attention_layernorm.weight") is None
    layer = "model.layers.7"
    assert checkpoint_name("blk.7.ffn_norm.weight", sandwich_norms=False) == f"{layer}.post_attention_layernorm.weight"
    assert checkpoint_name("blk.7.ffn_norm.weight", sandwich_norms=True) == f"{layer}.pre_feedforward_layernorm.weight"
    assert checkpoint_name("blk.7.unknown.weight", sandwich_norms=True) is None
