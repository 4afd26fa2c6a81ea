"""Gemma 1 / 2 / 3 text decoders in plain PyTorch, written to be traced to ONNX.

The forward takes the KV cache as tensors and returns the new cache as tensors: no
in-place writes, no cache objects, no Python branching on tensor values. What torch
traces is therefore already the ONNX KV-cache graph of docs/design.md's contract:

    input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
    past (k, v) per layer [B, KV, P, D]  ->  logits [B, S, V], present (k, v) [B, KV, P+S, D]

Module paths equal the Hugging Face checkpoint keys (`model.layers.3.self_attn.q_proj`),
so loading is an identity map. Numerical choices follow transformers' Gemma code, which
is the oracle in the tests; each is commented where it is made.

References: google/gemma_pytorch gemma/model.py, transformers models/gemma{,2,3}/modeling_*.py,
pytorch-labs/gpt-fast model.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma_export.models.config import GemmaConfig, LayerType

# The past/present key and value tensors of every layer, as the graph's past_key_values.* /
# present.* (runtime/session.py's KVCache is the runtime's device-resident counterpart).
PastKeyValues = tuple[Tensor, ...]  # (k0, v0, k1, v1, ...), each [B, KV, T, D]


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + w). Computed in fp32 with the 1 added in fp32 before any cast:
    adding it after a cast to fp16/bf16 would lose the small deltas w carries. Gemma 1-3
    store w (offset 1), Gemma 4 the scale itself (offset 0, config.norm_offset)."""

    def __init__(self, dim: int, eps: float, offset: float = 1.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.offset + self.weight.float() if self.offset else self.weight.float()
        return (xf * scale).to(x.dtype)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, scale: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, D] for half-rotation RoPE. Always fp32: positions up to 32k
    times frequencies lose whole radians in fp16. Linear scaling divides positions by
    `scale` (equivalently the frequencies), as transformers' "linear" rope type does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    inv_freq = inv_freq / scale
    freqs = position_ids.float()[:, :, None] * inv_freq[None, None, :]  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, h, S, D]; rotate the two halves of the head dim (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: LayerType):
        super().__init__()
        self.cfg = cfg
        self.layer_type = layer_type
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past_k: Tensor, past_v: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        B, S, _ = x.shape
        kv, d = self.n_kv, self.head_dim
        q = self.q_proj(x).view(B, S, self.n_heads, d).transpose(1, 2)  # (B, H, S, D)
        k = self.k_proj(x).view(B, S, kv, d).transpose(1, 2)  # (B, KV, S, D)
        v = self.v_proj(x).view(B, S, kv, d).transpose(1, 2)  # (B, KV, S, D)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat((past_k, k), dim=2)  # (B, KV, T, D)
        v = torch.cat((past_v, v), dim=2)

        out = grouped_attention(q, k, v, bias, self.scale, self.softcap)
        return self.o_proj(out), k, v


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float | None = None, softcap: float | None = None
) -> Tensor:
    """Attention of q (B, H, S, D) over k / v (B, KV, T, D) -> (B, S, H*D).
    Grouped heads without copying the cache: query head h uses kv head h // g, so the g query
    heads of each kv head fold into the row dim of one matmul. The scale multiplies the folded
    q (Reshape, then Mul): the attention rewrite matches that traced order."""
    B, H, S, d = q.shape
    kv = k.shape[1]
    g = H // kv
    qg = q.reshape(B, kv, g * S, d)  # (B, KV, G*S, D)
    if scale is not None:
        qg = qg * scale
    scores = torch.matmul(qg, k.transpose(2, 3)).float()  # (B, KV, G*S, T)
    if softcap is not None:  # Gemma 2: tanh soft-capping before the mask
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(B, kv, g, S, -1) + bias[:, :, None]  # bias (B, 1, 1, S, T)
    probs = torch.softmax(scores, dim=-1).to(v.dtype).view(B, kv, g * S, -1)
    out = torch.matmul(probs, v)  # (B, KV, G*S, D)
    return out.view(B, H, S, d).transpose(1, 2).reshape(B, S, H * d)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer_type: LayerType):
        super().__init__()
        self.layer_type = layer_type
        self.sandwich = cfg.sandwich_norms
        self.self_attn = Attention(cfg, layer_type)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Gemma 1 calls its pre-MLP norm `post_attention_layernorm` (checkpoint key);
        # Gemma 2/3 use that name for the norm after attention and add two more.
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        if self.sandwich:
            x = x + self.post_attention_layernorm(a)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        else:
            x = x + a
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class GemmaBackbone(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def attention_bias(
    attention_mask: Tensor, past_len: Tensor | int, seq_len: int, window: int | None, dtype: torch.dtype
) -> Tensor:
    """Additive mask (B, 1, S, T): 0 where query i (cache index past+i) may see key j.

    Causal, key not padding, and for sliding layers q - k < window, all by cache index.
    With left padding the real tokens are contiguous, so index distance equals position
    distance and a padded prompt sees exactly what it sees alone. Masked entries get the
    dtype's minimum rather than -inf so a fully padded query row stays finite.
    """
    total = attention_mask.shape[1]
    q_idx = torch.arange(seq_len, device=attention_mask.device)[:, None] + past_len  # (S, 1)
    k_idx = torch.arange(total, device=attention_mask.device)[None, :]  # (1, T)
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (q_idx - k_idx < window)
    allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()  # (B, 1, S, T)
    zero = torch.zeros((), dtype=dtype)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


class GemmaForCausalLM(nn.Module):
    """The decoder with a tied LM head. `forward` is the function the exporter traces."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.model = GemmaBackbone(cfg)

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> PastKeyValues:
        cfg = self.config
        shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
        return tuple(torch.zeros(shape, dtype=dtype) for _ in range(2 * cfg.num_hidden_layers))

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: PastKeyValues
    ) -> tuple[Tensor, PastKeyValues]:
        cfg = self.config
        B, S = input_ids.shape
        h = self.model.embed_tokens(input_ids)
        # sqrt(hidden) in the activation dtype, as transformers and gemma_pytorch do: the
        # checkpoints were trained with that rounding (bf16: 25.298 -> 25.25 for 640).
        h = h * torch.tensor(math.sqrt(cfg.hidden_size), dtype=h.dtype)

        ropes: dict[LayerType, tuple[Tensor, Tensor]] = {}
        biases: dict[LayerType, Tensor] = {}
        for t in set(cfg.layer_types):
            ropes[t] = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta_for(t), cfg.rope_scale_for(t))
            # Each layer type is masked by its own past's length: a bounded cache (contract:
            # window entries) gives sliding layers only their newest positions, the last
            # Pt + S columns of attention_mask. Cache index distance still equals position
            # distance there (the kept positions are contiguous), so causality and the
            # window hold as in the full cache; Pt = P is the plain contract.
            first = cfg.layer_types.index(t)
            Pt = past[2 * first].shape[2]
            window = cfg.sliding_window if t == LayerType.SLIDING else None
            mask_t = attention_mask[:, attention_mask.shape[1] - (Pt + S):] if window else attention_mask
            biases[t] = attention_bias(mask_t, Pt, S, window, torch.float32)

        present = []
        for i, layer in enumerate(self.model.layers):
            cos, sin = ropes[layer.layer_type]
            h, k, v = layer(h, cos, sin, biases[layer.layer_type], past[2 * i], past[2 * i + 1])
            present += [k, v]

        h = self.model.norm(h)
        # Tied head: the embedding matrix is the output projection, stored once.
        logits = F.linear(h, self.model.embed_tokens.weight).float()  # fp32 logits always
        if cfg.final_logit_softcapping is not None:
            c = cfg.final_logit_softcapping
            logits = torch.tanh(logits / c) * c
        return logits, tuple(present)
