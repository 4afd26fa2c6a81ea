"""The Gemma 4 text decoder in plain PyTorch, written to be traced to ONNX.

Same contract as models/gemma.py (KV tensors in, KV tensors out, no in-place writes),
with what Gemma 4 changed:

- Norms scale by w, not 1 + w (checkpoints store the scale itself); v is RMS-normed
  without a scale; attention scaling is 1 (q and k are normed per head).
- GLOBAL layers have their own head shape (global_head_dim, num_global_key_value_heads),
  "proportional" RoPE (only rope_global_partial_factor of each head rotates), and with
  attention_k_eq_v no v_proj (values are k_proj's output, then v-normed).
- The last num_kv_shared_layers layers compute no K/V: each attends over the cache of
  the last earlier layer of its type (config.kv_source). Only the first
  L - num_kv_shared_layers layers have past/present tensors, so the cache is

      past (k, v) per cache layer [B, KV_i, P, D_i]  ->  present [B, KV_i, P+S, D_i]

  with each entry's heads and head dim those of its layer's type (contract.kv_entries).
- Per-layer input embeddings (PLE): a second token table, [V_ple, L * W], gathered per
  token and mixed with a projection of the main embedding; layer i adds a gated
  projection of its slice after the MLP.
- An optional mixture-of-experts block beside the dense MLP (router, top-k, experts),
  as plain ops: each token gathers the weights of its top-k experts.

Module paths equal the Hugging Face checkpoint keys (model.layers.3.self_attn.q_proj,
model.layers.3.experts.gate_up_proj, model.embed_tokens_per_layer), so loading is an
identity map. transformers' models/gemma4/modeling_gemma4.py is the oracle in the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gemma_export.models.config import GemmaConfig, LayerType
from gemma_export.models.gemma import PastKeyValues, RMSNorm, apply_rope, attention_bias, grouped_attention


def rms(x: Tensor, eps: float) -> Tensor:
    """RMS normalisation without a scale (Gemma 4's v_norm and router norm), in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float, partial: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, S, D] in fp32. `partial` < 1 is transformers' "proportional" RoPE:
    the first partial * D / 2 frequencies are theta ** (-2j / D) (D, not the rotated width,
    in the exponent) and the rest are 0, so those dims are left as they are."""
    rotated = int(partial * head_dim // 2)
    inv_freq = 1.0 / (theta ** (torch.arange(0, 2 * rotated, 2, dtype=torch.float32) / head_dim))
    inv_freq = torch.cat((inv_freq, torch.zeros(head_dim // 2 - rotated)))
    freqs = position_ids.float()[:, :, None] * inv_freq[None, None, :]  # (B, S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D)
    return emb.cos()[:, None], emb.sin()[:, None]


class GeGLU(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)) of a given width (double on KV-shared layers when
    use_double_wide_mlp)."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Router(nn.Module):
    """Scores experts from the residual stream: rms(x) * scale / sqrt(hidden) -> proj ->
    softmax (fp32) -> top-k, renormalised to sum 1, times each chosen expert's scale."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.eps, self.k = cfg.rms_norm_eps, cfg.top_k_experts
        self.root = cfg.hidden_size**-0.5
        self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(cfg.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = rms(x, self.eps) * self.scale * self.root  # (N, H)
        probs = torch.softmax(self.proj(h).float(), dim=-1)  # (N, E)
        weights, index = torch.topk(probs, self.k, dim=-1)  # (N, K)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[index], index


class Experts(nn.Module):
    """num_experts GeGLU experts stored as 3-D tensors (the checkpoint's layout):
    gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I].

    Plain ops: each token gathers its k experts' matrices and multiplies them (Gather +
    MatMul in ONNX). A decode step reads k experts, not all E; a prefill of N tokens
    materialises N * k experts' weights, which is why long prompts should be chunked."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        E, H, W = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * W, H))
        self.down_proj = nn.Parameter(torch.zeros(E, H, W))

    def forward(self, x: Tensor, weights: Tensor, index: Tensor) -> Tensor:
        gu = torch.matmul(self.gate_up_proj[index], x[:, None, :, None]).squeeze(-1)  # (N, K, 2I)
        gate, up = gu.chunk(2, dim=-1)
        mid = F.gelu(gate, approximate="tanh") * up  # (N, K, I)
        out = torch.matmul(self.down_proj[index], mid[..., None]).squeeze(-1)  # (N, K, H)
        return (out * weights[..., None].to(out.dtype)).sum(dim=1)  # (N, H)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.kv_heads_for(layer)
        self.head_dim = d = cfg.head_dim_for(layer)
        self.eps = cfg.rms_norm_eps
        self.shares_kv = cfg.kv_source(layer) != layer
        off = cfg.norm_offset
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * d, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, off)
        self.o_proj = nn.Linear(self.n_heads * d, cfg.hidden_size, bias=False)
        self.has_v_proj = cfg.has_v_proj(layer)
        if not self.shares_kv:  # a KV-shared layer has no K/V weights at all
            self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * d, bias=False)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, off)
            if self.has_v_proj:
                self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, past_k: Tensor, past_v: Tensor):
        """past_k / past_v: this layer's past, or for a KV-shared layer its source layer's
        complete present (returned unchanged)."""
        B, S, _ = x.shape
        kv, d = self.n_kv, self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, S, self.n_heads, d)).transpose(1, 2)  # (B, H, S, D)
        q = apply_rope(q, cos, sin)
        if self.shares_kv:
            k, v = past_k, past_v  # (B, KV, T, D)
        else:
            k_raw = self.k_proj(x).view(B, S, kv, d)
            v_raw = self.v_proj(x).view(B, S, kv, d) if self.has_v_proj else k_raw  # k_eq_v: before k_norm
            k = apply_rope(self.k_norm(k_raw).transpose(1, 2), cos, sin)  # (B, KV, S, D)
            v = rms(v_raw, self.eps).transpose(1, 2)
            k = torch.cat((past_k, k), dim=2)  # (B, KV, T, D)
            v = torch.cat((past_v, v), dim=2)
        # Scaling is 1: q and k are RMS-normed.
        return self.o_proj(grouped_attention(q, k, v, bias)), k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.layer_type = cfg.layer_types[layer]
        H, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.self_attn = Attention(cfg, layer)
        self.mlp = GeGLU(H, cfg.mlp_width_for(layer))
        self.input_layernorm = RMSNorm(H, eps, off)
        self.post_attention_layernorm = RMSNorm(H, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(H, eps, off)
        self.post_feedforward_layernorm = RMSNorm(H, eps, off)
        # A learned per-layer multiplier on the layer's output (a checkpoint buffer).
        self.register_buffer("layer_scalar", torch.ones(1))
        self.moe = cfg.num_experts > 0
        if self.moe:
            self.router = Router(cfg)
            self.experts = Experts(cfg)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps, off)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps, off)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps, off)
        self.ple = cfg.hidden_size_per_layer_input > 0
        if self.ple:
            W = cfg.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(H, W, bias=False)
            self.per_layer_projection = nn.Linear(W, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps, off)

    def forward(self, x, per_layer_input, cos, sin, bias, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_k, past_v)
        x = x + self.post_attention_layernorm(a)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        if self.moe:
            # The experts read the residual stream before the dense MLP, beside it.
            B, S, H = x.shape
            flat = x.reshape(B * S, H)
            weights, index = self.router(flat)
            e = self.experts(self.pre_feedforward_layernorm_2(flat), weights, index).reshape(B, S, H)
            h = self.post_feedforward_layernorm_1(h) + self.post_feedforward_layernorm_2(e)
        x = x + self.post_feedforward_layernorm(h)
        if self.ple:
            g = F.gelu(self.per_layer_input_gate(x), approximate="tanh") * per_layer_input
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar, k, v


class Gemma4Backbone(nn.Module):
    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        if cfg.hidden_size_per_layer_input:
            L, W = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(cfg.vocab_size_per_layer_input, L * W)
            self.per_layer_model_projection = nn.Linear(cfg.hidden_size, L * W, bias=False)
            self.per_layer_projection_norm = RMSNorm(W, cfg.rms_norm_eps, cfg.norm_offset)


class Gemma4ForCausalLM(nn.Module):
    """The decoder with a tied LM head. `forward` is the function the exporter traces."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.model = Gemma4Backbone(cfg)

    def empty_cache(self, batch: int, dtype: torch.dtype = torch.float32) -> PastKeyValues:
        cfg = self.config
        out = []
        for i in cfg.cache_layers:
            shape = (batch, cfg.kv_heads_for(i), 0, cfg.head_dim_for(i))
            out += [torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)]
        return tuple(out)

    def per_layer_inputs(self, input_ids: Tensor, h: Tensor) -> Tensor:
        """PLE (B, S, L, W): (norm(proj(h) / sqrt(hidden)) + table[ids] * sqrt(W)) / sqrt(2),
        h being the scaled main embedding (transformers' get/project_per_layer_inputs)."""
        cfg, m = self.config, self.model
        B, S = input_ids.shape
        L, W = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        tok = m.embed_tokens_per_layer(input_ids)
        tok = (tok * torch.tensor(math.sqrt(W), dtype=tok.dtype)).view(B, S, L, W)
        proj = (m.per_layer_model_projection(h) * cfg.hidden_size**-0.5).view(B, S, L, W)
        return (m.per_layer_projection_norm(proj) + tok) * 2.0**-0.5

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: PastKeyValues
    ) -> tuple[Tensor, PastKeyValues]:
        cfg = self.config
        S = input_ids.shape[1]
        P = past[0].shape[2]
        h = self.model.embed_tokens(input_ids)
        # sqrt(hidden) in the activation dtype, as transformers does (models/gemma.py).
        h = h * torch.tensor(math.sqrt(cfg.hidden_size), dtype=h.dtype)
        ple = self.per_layer_inputs(input_ids, h) if cfg.hidden_size_per_layer_input else None

        ropes: dict[LayerType, tuple[Tensor, Tensor]] = {}
        biases: dict[LayerType, Tensor] = {}
        for t in set(cfg.layer_types):
            dim = cfg.head_dim_for(cfg.layer_types.index(t))
            theta = cfg.rope_theta_for(t)
            ropes[t] = rope_cos_sin(position_ids, dim, theta, cfg.rope_partial_for(t))
            window = cfg.sliding_window if t == LayerType.SLIDING else None
            biases[t] = attention_bias(attention_mask, P, S, window, torch.float32)

        present: list[Tensor] = []
        full: dict[int, tuple[Tensor, Tensor]] = {}  # cache layer -> its present (k, v)
        for i, layer in enumerate(self.model.layers):
            src = cfg.kv_source(i)
            pk, pv = full[src] if src != i else (past[2 * i], past[2 * i + 1])
            cos, sin = ropes[layer.layer_type]
            x_ple = ple[:, :, i] if ple is not None else None
            h, k, v = layer(h, x_ple, cos, sin, biases[layer.layer_type], pk, pv)
            if src == i:
                full[i] = (k, v)
                present += [k, v]

        h = self.model.norm(h)
        logits = F.linear(h, self.model.embed_tokens.weight).float()  # tied head, fp32 logits
        if cfg.final_logit_softcapping is not None:
            c = cfg.final_logit_softcapping
            logits = torch.tanh(logits / c) * c
        return logits, tuple(present)
