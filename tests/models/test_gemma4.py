"""Our Gemma 4 text decoder (models/gemma4.py) against transformers' Gemma4 (the
independent implementation), and its config / checkpoint loading.

Random weights loaded into both; fp32, max abs diff <= 1e-4 over real positions. The
tiny presets cover PLE, KV sharing (the last layers read earlier caches), double-wide
MLPs, wider global heads, proportional RoPE, k = v, fewer global kv heads and the MoE
block; prompts cross the sliding window (8) and the batch is left-padded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gemma_export.errors import CheckpointError
from gemma_export.models.config import GemmaConfig, LayerType
from gemma_export.models.load import PRESETS, build_model, load_model, model_class, preset_config, random_weights

TOL = 1e-4
TINY4 = ("tiny-gemma4", "tiny-gemma4-moe")


def ours(name: str, seed: int = 7, **changes):
    cfg = preset_config(name)
    if changes:
        cfg = cfg.replace(**changes)
    return build_model(cfg, random_weights(cfg, seed), cfg.name)


def hf_twin(model):
    from transformers import AutoConfig, AutoModelForCausalLM

    hcfg = AutoConfig.for_model(**model.config.to_hf_dict())
    hf = AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Gemma4ForCausalLM"
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    return hf


def ragged(cfg, B=3, S=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :6] = 0
    mask[2, :13] = 0
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


# The tiny presets, and variants: MQA everywhere, no PLE, all of k = v / global kv heads
# on the dense preset, several shared layers per source.
CASES = {
    "tiny-gemma4": {},
    "tiny-gemma4-moe": {},
    "tiny-gemma4-mqa": dict(num_key_value_heads=1),
    "tiny-gemma4-nople": dict(hidden_size_per_layer_input=0, vocab_size_per_layer_input=0),
    "tiny-gemma4-keqv": dict(attention_k_eq_v=True, num_global_key_value_heads=1),
    "tiny-gemma4-share3": dict(num_kv_shared_layers=3),
}


def case(name):
    base = "tiny-gemma4-moe" if name == "tiny-gemma4-moe" else "tiny-gemma4"
    return ours(base, **CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    model = case(name)
    hf = hf_twin(model)
    cfg = model.config
    ids, mask, pos = ragged(cfg)
    with torch.no_grad():
        # logits_to_keep as indices (all of them): transformers 5.24's shortcut for the
        # KV-shared layers (_maybe_slice_kv_shared_inputs) indexes per_layer_inputs even
        # when a config has no PLE; a tensor argument skips that shortcut.
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=torch.arange(ids.shape[1])).logits
        got, present = model(ids, mask, pos, model.empty_cache(3))
    diff = (got - ref).abs()[mask.bool()]
    assert diff.max().item() <= TOL, f"max abs diff {diff.max().item():.3g} (mean {diff.mean().item():.3g})"
    # The cache: one (k, v) per non-shared layer, each with its layer type's shape.
    assert len(present) == 2 * (cfg.num_hidden_layers - cfg.num_kv_shared_layers)
    for i in cfg.cache_layers:
        assert present[2 * i].shape == (3, cfg.kv_heads_for(i), 21, cfg.head_dim_for(i))


@pytest.mark.parametrize("name", TINY4)
def test_incremental_decode_matches_transformers(name):
    """Prefill 5, then one token at a time through our cache (past the window), against
    transformers' full forward: the KV-shared layers read the growing earlier caches."""
    model = ours(name)
    hf = hf_twin(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (1, 20), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
        logits, cache = model(ids[:, :5], torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None],
                              model.empty_cache(1))
        rows = [logits[0]]
        for t in range(5, 20):
            logits, cache = model(ids[:, t:t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), cache)
            rows.append(logits[0])
    assert (torch.cat(rows) - ref).abs().max().item() <= TOL


def test_shared_layers_have_no_kv_weights_and_read_their_source():
    cfg = preset_config("tiny-gemma4")
    assert cfg.cache_layers == (0, 1, 2, 3)
    assert [cfg.kv_source(i) for i in range(6)] == [0, 1, 2, 3, 3, 2]  # S S G S | S G
    names = set(ours("tiny-gemma4").state_dict())
    for i in (4, 5):
        assert not any(n.startswith(f"model.layers.{i}.self_attn.k_") for n in names)
    assert "model.layers.4.mlp.gate_proj.weight" in names
    model = ours("tiny-gemma4")
    assert model.model.layers[4].mlp.gate_proj.weight.shape[0] == 2 * cfg.intermediate_size  # double-wide


def test_real_shape_presets_build_on_meta():
    """The real shapes are consistent configs; E2B's PLE table is its largest tensor."""
    for name in ("gemma4-e2b", "gemma4-e4b", "gemma4-26b-a4b", "gemma4-31b"):
        cfg = preset_config(name)
        with torch.device("meta"):
            m = model_class(cfg)(cfg)
        n = sum(p.numel() for p in m.state_dict().values())
        assert n > 1e9, name
    cfg = preset_config("gemma4-e2b")
    with torch.device("meta"):
        sd = model_class(cfg)(cfg).state_dict()
    biggest = max(sd, key=lambda k: sd[k].numel())
    assert biggest == "model.embed_tokens_per_layer.weight"


# -- config parsing and checkpoints -------------------------------------------------------


def test_hf_dict_round_trip():
    for name in TINY4 + ("gemma4-e2b", "gemma4-26b-a4b"):
        cfg = preset_config(name)
        assert GemmaConfig.from_hf_dict(cfg.to_hf_dict(), cfg.name) == cfg


def test_transformers_saved_config_parses(tmp_path):
    """A config.json written by transformers (per_layer_config, not global_head_dim)."""
    from transformers import AutoConfig

    for name in TINY4:
        cfg = preset_config(name)
        AutoConfig.for_model(**cfg.to_hf_dict()).save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert "per_layer_config" in saved
        assert GemmaConfig.from_hf_file(tmp_path / name / "config.json").replace(name=cfg.name) == cfg


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "multimodal"])
def test_hf_checkpoint_directory_loads(tmp_path, multimodal):
    """save_pretrained of a transformers Gemma 4 (text-only, or the multimodal model whose
    text decoder sits under model.language_model. beside a vision tower) loads into logits
    equal to transformers'."""
    from transformers import AutoConfig, Gemma4Config, Gemma4ForConditionalGeneration

    src = ours("tiny-gemma4")
    hf = hf_twin(src)
    if multimodal:
        text = AutoConfig.for_model(**src.config.to_hf_dict()).to_dict()
        mm_cfg = Gemma4Config(
            text_config=text, audio_config=None,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16),
        )
        mm = Gemma4ForConditionalGeneration(mm_cfg).eval()
        missing, unexpected = mm.model.language_model.load_state_dict(
            {k[len("model."):]: v for k, v in src.state_dict().items()}, strict=False)
        assert not missing and not unexpected
        mm.save_pretrained(tmp_path / "ckpt")
    else:
        hf.save_pretrained(tmp_path / "ckpt")
    ckpt = load_model(tmp_path / "ckpt")
    assert ckpt.config.family == 4
    ids = torch.randint(4, ckpt.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    mask, pos = torch.ones_like(ids), torch.arange(19)[None].expand(2, -1)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got, _ = ckpt.model(ids, mask, pos, ckpt.model.empty_cache(2))
    assert (got - ref).abs().max().item() <= TOL


def test_unused_kv_weights_of_shared_layers_are_dropped(tmp_path):
    """Checkpoints may store k/v weights for KV-shared layers (transformers ignores them);
    the strict loader drops exactly those and still refuses any other stray tensor."""
    from safetensors.torch import save_file

    cfg = preset_config("tiny-gemma4")
    state = random_weights(cfg, 3)
    extra = {"model.layers.5.self_attn.k_proj.weight": torch.zeros(64, 64),
             "model.layers.4.self_attn.v_norm.weight": torch.ones(16)}
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file(state | extra, str(d / "model.safetensors"))
    assert load_model(d).config.num_kv_shared_layers == 2
    save_file(state | {"model.layers.3.self_attn.v_norm.weight": torch.ones(16)}, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.3.self_attn.v_norm.weight"):
        load_model(d)


@pytest.mark.parametrize("field,value", [
    ("use_bidirectional_attention", "all"),
    ("attention_bias", True),
    ("hidden_activation", "silu"),
])
def test_unsupported_fields_refused_by_name(field, value):
    d = preset_config("tiny-gemma4").to_hf_dict() | {field: value}
    with pytest.raises(CheckpointError) as e:
        GemmaConfig.from_hf_dict(d, "x/config.json")
    msg = str(e.value)
    assert "\n" not in msg and field in msg and "x/config.json" in msg


def test_unsupported_rope_and_per_layer_overrides_refused():
    d = preset_config("tiny-gemma4").to_hf_dict()
    bad = json.loads(json.dumps(d))
    bad["rope_parameters"]["full_attention"]["rope_type"] = "yarn"
    with pytest.raises(CheckpointError, match="rope_parameters.full_attention.rope_type 'yarn'"):
        GemmaConfig.from_hf_dict(bad)
    bad = dict(d, per_layer_config={"2": {"head_dim": 32, "intermediate_size": 7}})
    with pytest.raises(CheckpointError, match=r"per_layer_config\[2\].intermediate_size"):
        GemmaConfig.from_hf_dict(bad)


def test_kv_sharing_needs_a_source_of_each_type():
    cfg = preset_config("tiny-gemma4")
    types = (LayerType.SLIDING,) * 4 + (LayerType.GLOBAL,) * 2
    with pytest.raises(CheckpointError, match="num_kv_shared_layers: layer 4 .full_attention. has no earlier"):
        cfg.replace(layer_types=types)


def test_presets_registered():
    names = {"tiny-gemma4", "tiny-gemma4-moe", "gemma4-e2b", "gemma4-e4b", "gemma4-26b-a4b", "gemma4-31b"}
    assert names <= set(PRESETS)


@pytest.mark.parametrize("name", TINY4)
def test_tiny_presets_load_their_trained_weights(name):
    """A tiny Gemma 4 preset is its shipped trained weights (models/data/TRAINED.md): it
    predicts the next byte of English far better than its random start (seed 0, which a
    `seed` still gives), and both load strictly into the preset's config."""
    from gemma_export.exporter.tokenizer_source import preset_tokenizer
    from gemma_export.runtime.tokenizer import Tokenizer

    trained, start = load_model(name), load_model(name, seed=0)
    cfg = trained.config
    tok = Tokenizer.from_bytes(preset_tokenizer(cfg.vocab_size, cfg.family))
    ids = torch.tensor([tok.encode("The committee agreed that every member of the family has the right to rest.")])
    mask, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]

    def loss(model):
        with torch.no_grad():
            logits, _ = model(ids, mask, pos, model.empty_cache(1))
        return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()

    assert loss(trained.model) < 3.0 < 5.0 < loss(start.model)


def test_training_script_trains_a_preset():
    """scripts/train_tiny_presets.py's loop: a few steps change every weight matrix and
    keep the preset's names and shapes."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny_presets.py"
    spec = importlib.util.spec_from_file_location("train_tiny_presets", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    ids = list(np.random.default_rng(0).integers(6, 512, 2000))
    state, loss = script.train("tiny-gemma4", ids, steps=3, log=lambda _: None)
    start = random_weights(preset_config("tiny-gemma4"), 0)
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in start.items()}
    assert all(not torch.equal(state[k], start[k]) for k in start if start[k].dim() == 2)
    assert np.isfinite(loss)
