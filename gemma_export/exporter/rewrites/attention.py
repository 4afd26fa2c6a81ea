"""A layer's attention -> RotaryEmbedding x2 + one GroupQueryAttention (com.microsoft).

    q, k, v (the projections' outputs, [B, S, heads*D])
      ─ Reshape/Transpose ─ [q_norm, k_norm] ─ RoPE ─ Concat(past) ─ scale ─ QK^T
      ─ [softcap] ─ + mask ─ Softmax ─ ·V ─ Transpose/Reshape ─ o_proj
  ->
    q, k ─ [per-head SimplifiedLayerNormalization] ─ RotaryEmbedding(index, cos, sin)
    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_sequence_length,
                        attention_bias=mask; num_heads, kv_num_heads, scale, softcap)
      -> out, present_key, present_value

About 45 nodes per layer become three (six with QK-norm). Exactness, left padding included:
  - the additive mask the graph already builds from attention_mask (causal by cache index,
    sliding window, left padding) goes in as attention_bias; seqlens_k = T - 1 for every
    row (T = attention_mask's width) and total_sequence_length = T, so every row writes
    the same cache slots [T - S, T) and GQA's own causal mask (by cache index) agrees
    with the bias; no local_window_size, the bias carries the window;
  - RoPE is RotaryEmbedding on the explicit position_ids (left-padded rows start at 0):
    GQA's internal rotary takes one start position per row in a first prompt, which left
    padding breaks. Its cos/sin rows are computed per step for exactly the fed positions,
    in fp32 from the same inverse frequencies as models/gemma.py;
  - scale = query_pre_attn_scalar^-0.5, softcap = Gemma 2's attention softcap. ONNX
    Runtime 1.32's GQA caps the scores before adding the bias, as Gemma 2 does (a test
    checks it: masked keys get weight 0 even when every visible score is near -softcap);
  - QK-norm stays a SimplifiedLayerNormalization per head in front of the rotary.
The graph keeps the concat contract (GQA with a past of P positions and a present of
P + S is exact too); rewrites/shared_cache.py then turns the cache into one buffer per
tensor, read and written in place. Why GroupQueryAttention (on that buffer) rather than
ONNX's Attention: measured in docs/design.md ("Attention fusion").

Needs the model's config (head counts, RoPE bases per layer type), so optimize_graph runs
it only when given one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gemma_export.exporter.rewrites import (
    MS_DOMAIN,
    Graph,
    Rule,
    add_initializer,
    dead_code_elimination,
    insert_after,
    int64_initializer,
)

# Scope of the nodes every fused layer reads (positions, RoPE rows, GQA's lengths): built
# once, by the first layer fused. rewrites/shared_cache.py reads some of them too.
COMMON_SCOPE = "/model/attention"


def _scope(node: onnx.NodeProto) -> str | None:
    parts = node.name.split("/self_attn/")
    return parts[0] + "/self_attn/" if len(parts) == 2 else None


def _layer(scope: str) -> int | None:
    try:
        return int(scope.split("/layers.")[1].split("/")[0])
    except (IndexError, ValueError):
        return None


class AttentionRule(Rule):
    def __init__(self, cfg):
        super().__init__("group_query_attention")
        self.cfg = cfg

    def match(self, g: Graph, softmax):
        if softmax.op_type != "Softmax":
            return "not a Softmax"
        scope = _scope(softmax)
        if scope is None:
            return "Softmax outside a self_attn scope"
        i = _layer(scope)
        if i is None or not 0 <= i < self.cfg.num_hidden_layers:
            return "no layer index in the scope"
        if self.cfg.family == 4:
            # Per-layer head shapes, attention scale 1, and KV-shared layers reading another
            # layer's cache: not what this rewrite builds. Gemma 4 keeps plain attention.
            return "Gemma 4 attention is not fused"
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        pres_k, pres_v = f"present.{i}.key", f"present.{i}.value"
        cat_k, cat_v = g.prod(pres_k, "Concat"), g.prod(pres_v, "Concat")
        if cat_k is None or cat_v is None or cat_k.input[0] != past_k or cat_v.input[0] != past_v:
            return "present is not Concat(past, new)"
        add = g.prod(softmax.input[0], "Add")
        if add is None:
            return "Softmax input is not scores + mask"
        unsq = next((g.producer[x] for x in add.input if g.prod(x, "Unsqueeze")), None)
        if unsq is None:
            return "no Unsqueeze(mask) added to the scores"
        mask = unsq.input[0]
        # v: Concat(past, Transpose(Reshape(v)))
        v = _back(g, cat_v.input[1], ("Transpose", "Reshape"))
        # k: Concat(past, RoPE(...)); walk RoPE's Add/Mul to Transpose(Reshape(k)) or SLN
        k, k_norm = _rope_source(g, cat_k.input[1])
        if v is None or k is None:
            return "k/v are not reshaped projections"
        # q: the QK MatMul's other input, scaled, reshaped, RoPE'd
        qk = next((n for n in g.consumers.get(pres_k, []) if n.op_type == "Transpose"), None)
        mm = g.consumers.get(qk.output[0], [None])[0] if qk is not None else None
        if mm is None or mm.op_type != "MatMul":
            return "no QK^T MatMul on present.key"
        rot_q = _back(g, mm.input[0], ("Mul", "Reshape"))
        q, q_norm = _rope_source(g, rot_q) if rot_q else (None, None)
        if q is None:
            return "q is not a reshaped projection"
        if (q_norm is None) != (k_norm is None):
            return "only one of q/k is normalised"
        # out: PV MatMul on present.value, then Reshape/Transpose/Reshape to o_proj
        pv = next((n for n in g.consumers.get(pres_v, []) if n.op_type == "MatMul"), None)
        if pv is None:
            return "no softmax·V MatMul on present.value"
        cur = pv.output[0]
        for _ in range(3):
            users = g.consumers.get(cur, [])
            if len(users) != 1 or users[0].op_type not in ("Reshape", "Transpose"):
                return "attention output is not Reshape/Transpose'd into o_proj"
            cur = users[0].output[0]
        out = cur
        # GroupQueryAttention takes over these three outputs; what only fed them goes with DCE.
        replaced = [g.producer[out], cat_k, cat_v]
        return {"layer": i, "scope": scope, "q": q, "k": k, "v": v, "mask": mask, "out": out,
                "q_norm": q_norm, "k_norm": k_norm, "replaced": replaced, "at": pv}

    def rewrite(self, g: Graph, m) -> None:
        cfg = self.cfg
        i = m["layer"]
        ltype = cfg.layer_types[i]
        common = _common_inputs(ltype)
        q, k, pre = m["q"], m["k"], []
        if m["q_norm"] is not None:
            # The per-head RMSNorm stays a SimplifiedLayerNormalization over [.., D], in
            # front of the rotary (GQA's own QK-norm needs its own rotary; see the docstring).
            q = _head_norm(g, pre, m["scope"] + "q_norm", q, *m["q_norm"], cfg.head_dim)
            k = _head_norm(g, pre, m["scope"] + "k_norm", k, *m["k_norm"], cfg.head_dim)
        # RoPE as RotaryEmbedding on the explicit position_ids (left-padded rows start at 0).
        q = _rotary(pre, m["scope"] + "q_rotary", q, common)
        k = _rotary(pre, m["scope"] + "k_rotary", k, common)
        ins = [q, k, m["v"], f"past_key_values.{i}.key", f"past_key_values.{i}.value", common["seqlens_k"],
               common["total"], "", "", "", m["mask"]]
        attrs = dict(num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
                     scale=float(cfg.query_pre_attn_scalar) ** -0.5)
        if cfg.attn_logit_softcapping:
            attrs["softcap"] = float(cfg.attn_logit_softcapping)
        node = helper.make_node("GroupQueryAttention", ins, [m["out"], f"present.{i}.key", f"present.{i}.value"],
                                name=f"{m['scope']}GroupQueryAttention", domain=MS_DOMAIN, **attrs)
        g.replace(m["replaced"], [*pre, node], at=m["at"])  # before _ensure_common_inputs re-lists the nodes
        _ensure_common_inputs(g, cfg, ltype)
        dead_code_elimination(g)


def _rotary(nodes: list, scope: str, x: str, common: dict[str, str]) -> str:
    nodes.append(helper.make_node("RotaryEmbedding", [x, common["index"], common["cos"], common["sin"]],
                                  [f"{scope}/out"], name=f"{scope}/RotaryEmbedding", domain=MS_DOMAIN,
                                  interleaved=0))
    return f"{scope}/out"


def _head_norm(g: Graph, nodes: list, scope: str, x: str, weight: str, eps: float, head_dim: int) -> str:
    heads = int64_initializer(g, f"{COMMON_SCOPE}/heads_shape", [0, 0, -1, head_dim], [4])
    flat = int64_initializer(g, f"{COMMON_SCOPE}/flat_shape", [0, 0, -1], [3])
    nodes += [
        helper.make_node("Reshape", [x, heads], [f"{scope}/heads"], name=f"{scope}/Reshape"),
        helper.make_node("SimplifiedLayerNormalization", [f"{scope}/heads", weight], [f"{scope}/normed"],
                         name=f"{scope}/SimplifiedLayerNormalization", axis=-1, epsilon=eps, stash_type=1),
        helper.make_node("Reshape", [f"{scope}/normed", flat], [f"{scope}/out"], name=f"{scope}/Reshape_1"),
    ]
    return f"{scope}/out"


def _back(g: Graph, name: str, ops: tuple[str, ...]) -> str | None:
    """Walk producers through `ops` (first input each time); the tensor before them."""
    cur = name
    for op in ops:
        n = g.prod(cur, op)
        if n is None:
            return None
        cur = n.input[0]
    return cur


def _rope_source(g: Graph, rot: str):
    """RoPE's Add(Mul(x, cos), Mul(rotate_half(x), sin)): (projection output, norm or None),
    where x is Transpose(Reshape(proj)) or SLN(Transpose(Reshape(proj)))."""
    add = g.prod(rot, "Add")
    if add is None:
        return None, None
    for t in add.input:
        mul = g.prod(t, "Mul")
        if mul is None:
            continue
        for x in mul.input:
            sln = g.prod(x, "SimplifiedLayerNormalization")
            norm = None
            if sln is not None:
                eps = next((a.f for a in sln.attribute if a.name == "epsilon"), 1e-5)
                norm, x = (sln.input[1], eps), sln.input[0]
            src = _back(g, x, ("Transpose", "Reshape"))
            if src is not None:
                return src, norm
    return None, None


def _common_inputs(ltype) -> dict[str, str]:
    """Names of the tensors every layer of type `ltype` reads (see _ensure_common_inputs)."""
    p = COMMON_SCOPE
    return {"index": f"{p}/rope_index", "cos": f"{p}/{ltype.value}/cos_cache", "sin": f"{p}/{ltype.value}/sin_cache",
            "seqlens_k": f"{p}/seqlens_k", "total": f"{p}/total_sequence_length"}


def _ensure_common_inputs(g: Graph, cfg, ltype) -> dict[str, str]:
    """Graph-level inputs of the fused nodes, built once at the top of the graph:
      - per layer type, RoPE cos/sin rows for exactly the fed positions ([B*S, D/2], row
        b*S + s holds position_ids[b, s]) and the index [B, S] RotaryEmbedding reads them
        by: one row per token, so a step costs the same at any context length;
      - GroupQueryAttention's lengths: T = attention_mask's width, seqlens_k = T - 1 for
        every row (left padding is in the bias, so every row fills the same cache slots),
        total_sequence_length = T."""
    p = COMMON_SCOPE
    names = _common_inputs(ltype)
    new = []
    if names["index"] not in g.producer:
        neg1 = int64_initializer(g, f"{p}/minus_one", [-1], [1])
        one, zero = int64_initializer(g, f"{p}/one_s", [1], []), int64_initializer(g, f"{p}/zero_s", [0], [])
        new += [
            helper.make_node("Reshape", ["position_ids", neg1], [f"{p}/pos_flat"], name=f"{p}/Reshape_pos"),
            helper.make_node("Cast", [f"{p}/pos_flat"], [f"{p}/posf"], name=f"{p}/Cast_pos", to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", [f"{p}/posf", int64_initializer(g, f"{p}/one", [1], [1])], [f"{p}/pos2d"],
                             name=f"{p}/Unsqueeze_pos"),
            helper.make_node("Size", ["position_ids"], [f"{p}/n_tokens"], name=f"{p}/Size"),
            helper.make_node("Range", [zero, f"{p}/n_tokens", one], [f"{p}/token_range"], name=f"{p}/Range"),
            helper.make_node("Shape", ["position_ids"], [f"{p}/ids_shape"], name=f"{p}/Shape_ids"),
            helper.make_node("Reshape", [f"{p}/token_range", f"{p}/ids_shape"], [names["index"]],
                             name=f"{p}/Reshape_index"),
            # lengths for GroupQueryAttention, from attention_mask [B, T]
            helper.make_node("Shape", ["attention_mask"], [f"{p}/mask_shape"], name=f"{p}/Shape_mask"),
            helper.make_node("Slice", [f"{p}/mask_shape", int64_initializer(g, f"{p}/one", [1], [1]),
                                       int64_initializer(g, f"{p}/two", [2], [1])],
                             [f"{p}/T"], name=f"{p}/Slice_T_lengths"),
            helper.make_node("Reshape", [f"{p}/T", int64_initializer(g, f"{p}/scalar", [], [0])], [f"{p}/T_s"],
                             name=f"{p}/Reshape_T"),
            helper.make_node("Cast", [f"{p}/T_s"], [names["total"]], name=f"{p}/Cast_T", to=TensorProto.INT32),
            helper.make_node("Sub", [f"{p}/T", int64_initializer(g, f"{p}/one", [1], [1])], [f"{p}/T_minus_1"],
                             name=f"{p}/Sub_T"),
            helper.make_node("Slice", [f"{p}/mask_shape", int64_initializer(g, f"{p}/zero", [0], [1]),
                                       int64_initializer(g, f"{p}/one", [1], [1])],
                             [f"{p}/B"], name=f"{p}/Slice_B"),
            helper.make_node("Expand", [f"{p}/T_minus_1", f"{p}/B"], [f"{p}/seqlens_k64"], name=f"{p}/Expand_seqlens"),
            helper.make_node("Cast", [f"{p}/seqlens_k64"], [names["seqlens_k"]], name=f"{p}/Cast_seqlens",
                             to=TensorProto.INT32),
        ]
    if names["cos"] not in g.producer:
        t = ltype.value
        d = cfg.head_dim
        # models/gemma.py's rope_cos_sin: fp32 inverse frequencies, divided by the linear scale
        inv = (1.0 / (np.float32(cfg.rope_theta_for(ltype)) ** (np.arange(0, d, 2, dtype=np.float32) / d)))
        inv = (inv.astype(np.float32) / np.float32(cfg.rope_scale_for(ltype))).astype(np.float32)
        add_initializer(g, numpy_helper.from_array(inv[None, :], f"{p}/{t}/inv_freq"))
        new += [
            helper.make_node("Mul", [f"{p}/pos2d", f"{p}/{t}/inv_freq"], [f"{p}/{t}/freqs"], name=f"{p}/{t}/Mul"),
            helper.make_node("Cos", [f"{p}/{t}/freqs"], [names["cos"]], name=f"{p}/{t}/Cos"),
            helper.make_node("Sin", [f"{p}/{t}/freqs"], [names["sin"]], name=f"{p}/{t}/Sin"),
        ]
    if new:
        # At the top of the graph; a second layer type's cos/sin go right after the position
        # block they read, so the node list stays topologically sorted.
        insert_after(g, new, after=f"{p}/pos2d" if f"{p}/pos2d" in g.producer else None)
    return names
