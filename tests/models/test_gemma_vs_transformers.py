"""Our PyTorch Gemma against transformers' (an independent implementation) on every
preset family, with MQA, GQA and MHA, prompts longer than the sliding window, and a
left-padded batch. fp32, max abs diff <= 1e-4."""

from __future__ import annotations

import pytest
import torch

from gemma_export.models.load import build_model, preset_config, random_weights

TOL = 1e-4


def hf_twin(ckpt_model):
    """A transformers model with the same config and weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = ckpt_model.config
    hcfg = AutoConfig.for_model(**cfg.to_hf_dict())
    hf = AutoModelForCausalLM.from_config(hcfg, attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(ckpt_model.state_dict(), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to the embedding
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def variant(name: str, kv_heads: int | None):
    cfg = preset_config(name)
    if kv_heads is not None:
        cfg = cfg.replace(num_key_value_heads=kv_heads)
    return build_model(cfg, random_weights(cfg, seed=7), cfg.name)


# (preset, kv heads): each family with MQA (1), GQA (2) and MHA (4 = heads)
CASES = [(f, kv) for f in ("tiny-gemma1", "tiny-gemma2", "tiny-gemma3") for kv in (1, 2, 4)]


@pytest.mark.parametrize("name,kv", CASES, ids=[f"{f}-kv{kv}" for f, kv in CASES])
def test_logits_match_transformers(name, kv):
    model = variant(name, kv)
    hf = hf_twin(model)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    B, S = 3, 21  # longer than the tiny sliding window (8)
    ids = torch.randint(4, cfg.vocab_size, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :6] = 0  # left padding
    mask[2, :13] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours, present = model(ids, mask, pos, model.empty_cache(B))
    real = mask.bool()
    diff = (ours - ref).abs()[real]
    assert diff.max().item() <= TOL, f"max abs diff {diff.max().item():.3g} (mean {diff.mean().item():.3g})"
    assert len(present) == 2 * cfg.num_hidden_layers
    assert present[0].shape == (B, cfg.num_key_value_heads, S, cfg.head_dim)


@pytest.mark.parametrize("name", ["tiny-gemma1", "tiny-gemma2", "tiny-gemma3"])
def test_incremental_decode_matches_transformers_cache(name):
    """Prefill then token-by-token through our tensor cache == transformers' full forward."""
    model = variant(name, None)
    hf = hf_twin(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, model.config.vocab_size, (1, 20), generator=g)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits[0]
        logits, cache = model(ids[:, :5], torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None],
                              model.empty_cache(1))
        rows = [logits[0]]
        for t in range(5, 20):
            logits, cache = model(ids[:, t : t + 1], torch.ones(1, t + 1, dtype=torch.long), torch.tensor([[t]]), cache)
            rows.append(logits[0])
    ours = torch.cat(rows)
    assert (ours - ref).abs().max().item() <= TOL


def test_left_padded_row_equals_prompt_alone():
    model = variant("tiny-gemma3", None)
    g = torch.Generator().manual_seed(2)
    short = torch.randint(4, 512, (1, 9), generator=g)
    long = torch.randint(4, 512, (1, 17), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 8, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[0, :8] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch, _ = model(ids, mask, pos, model.empty_cache(2))
        alone, _ = model(short, torch.ones_like(short), torch.arange(9)[None], model.empty_cache(1))
    assert (batch[0, 8:] - alone[0]).abs().max().item() <= 1e-5
