"""Narrow-float recipes, fp16 and bf16: mixed precision for GPUs, a pure transformation of
the fp32 graph.

The weights and the products that read them run narrow; everything that decides
Gemma's range stays fp32:

    MatMul(x, W)          ->  Cast(x, T) -> MatMul(., W_T) -> Cast(fp32)
    Gemm(h, E, transB=1)  ->  Cast(h, T) -> Gemm(., E_T)   -> Cast(fp32)   (logits leave fp32)
    Gather(E, ids)        ->  Gather(E_T, ids) -> Cast(fp32)   (and Gemma 4's per-layer table)

Kept fp32: the residual stream, RMSNorm, RoPE, attention scores and softmax, the KV
cache, GELU, the logits (KEPT_FP32 below, recorded in the manifest). The tied embedding
is one T tensor read by the gather and the LM head.

fp16's range guard: Gemma's activations can pass fp16's 65504. Before casting, the fp32
graph runs once on calibration tokens and every candidate MatMul whose input or output
reaches 1/RANGE_MARGIN of the fp16 maximum stays fp32; the manifest lists them by name.
bf16 has fp32's exponent range and needs no guard.

ONNX Runtime's CPU provider does not compute narrow products as CUDA does: it has no bf16
MatMul or Gemm (bf16 kernels only for Cast, Gather, Transpose, Concat; onnxruntime 1.32),
and it runs fp16 ones by inserting casts to fp32 and then dropping the rounding. Each
artifact therefore carries a second graph, `model.cpu.onnx`, over the same weights file,
where each narrow product is Cast(fp32) -> fp32 product -> Cast(narrow): the rounding of
inputs and output of a narrow GEMM with fp32 accumulation (what CUDA runs), so CPU parity
checks the numbers CUDA computes. The runtime picks the graph by provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from gemma_export.contract import EMBED_WEIGHT, PLE_WEIGHT
from gemma_export.errors import ExportError
from gemma_export.exporter import lazy_weights
from gemma_export.exporter.calibrate import empty_past, fp32_session, run_fed

FP16_MAX = 65504.0
# A MatMul stays fp32 when calibration sees |x| above FP16_MAX / RANGE_MARGIN at its
# input or output: prompts unlike the calibration text may reach further.
RANGE_MARGIN = 8.0

KEPT_FP32 = [
    "the residual stream and every activation between products",
    "RMSNorm weights and arithmetic",
    "RoPE",
    "attention scores, softmax and the KV cache",
    "GELU",
    "logits (the LM head's product is cast back to fp32)",
]

_NARROW = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_TAGS = {v: k for k, v in _NARROW.items()}


@dataclass(frozen=True)
class NarrowRecipe:
    name: str  # "fp16" | "bf16"

    @property
    def dtype(self) -> int:
        return _NARROW[self.name]

    @property
    def head_dtype(self) -> int:
        """The tied embedding / LM head is fp16 in both recipes: bf16 logits are spaced
        0.125 apart at |logit| 16-32, and that rounding alone flips Gemma 3 270M's greedy
        token often enough to fail docs/design.md's 99% (measured: 96.8% corpus top-1 with a
        bf16 head, 99.1% with a wider one). Logits and the normalized hidden state that
        feeds the head sit far inside fp16's range, which range_guard checks."""
        return TensorProto.FLOAT16

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "narrow": f"MatMul weights and products in {self.name}; tied embedding and LM head in fp16",
            "range_margin": RANGE_MARGIN,
        }


# -- numbers (pure) --------------------------------------------------------------------------


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN. A slice at
    a time, so the uint32 temporaries stay small beside a 9.4 GB table."""
    flat = np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, np.uint16)
    for i in range(0, flat.size, _BF16_SLICE):
        x = flat[i:i + _BF16_SLICE]
        u = x.view(np.uint32)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(x)
        if nan.any():
            rounded[nan] = 0x7FC0
        out[i:i + _BF16_SLICE] = rounded
    return out.reshape(np.shape(a))


_BF16_SLICE = 1 << 22


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def narrow_tensor(t: onnx.TensorProto, dtype: int, made: lazy_weights.Initializers | None = None) -> onnx.TensorProto:
    """`t` in fp16 or bf16, made through `made` (a large one into its scratch file)."""
    a = lazy_weights.array(t)
    made = made if made is not None else lazy_weights.Initializers()
    if dtype == TensorProto.FLOAT16:
        return made.add(a.astype(np.float16), t.name)
    out = made.add(to_bf16_bits(a), t.name)  # uint16 bits, read as bfloat16
    out.data_type = TensorProto.BFLOAT16
    return out


# -- which nodes -----------------------------------------------------------------------------


def _candidates(g: onnx.GraphProto, inits: dict) -> list[onnx.NodeProto]:
    """Products whose weight is an fp32 initializer, the embedding gather and Gemma 4's
    per-layer embedding gather (E2B: 9.4 GB in fp32, read a row per token)."""
    out = []
    for n in g.node:
        if n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2 and n.input[1] in inits:
            if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
                continue  # no biased Gemm in our graphs; leave any such node alone
            out.append(n)
        elif n.op_type == "Gather" and n.input[0] in (EMBED_WEIGHT, PLE_WEIGHT):
            out.append(n)
    return [n for n in out if inits[_weight(n)].data_type == TensorProto.FLOAT]


def _weight(n: onnx.NodeProto) -> str:
    """The initializer a candidate reads: a product's B, the gather's table."""
    return n.input[0] if n.op_type == "Gather" else n.input[1]


def calibrate_ranges(model_path: Path, ids: np.ndarray, names: list[str]) -> dict[str, float]:
    """max |value| of each tensor in `names` when the fp32 graph at `model_path` runs on
    `ids` [1, S] (past length 0). Source artifacts are never written to."""
    sess = fp32_session(model_path, names)
    s = ids.shape[1]
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, s), np.int64),
             "position_ids": np.arange(s, dtype=np.int64)[None], **empty_past(sess, 1)}
    vals = run_fed(sess, names, feeds)
    return {n: float(np.abs(v).max()) if v.size else 0.0 for n, v in zip(names, vals)}


# -- the rewrite -----------------------------------------------------------------------------


def range_guard(model_path: Path, proto: onnx.ModelProto, ids: np.ndarray) -> dict[str, float]:
    """fp16's guard: {product node name: calibrated max |x|} for every candidate product
    whose input or output passes FP16_MAX / RANGE_MARGIN on `ids`."""
    inits = {i.name: i for i in proto.graph.initializer}
    products = [n for n in _candidates(proto.graph, inits) if n.op_type != "Gather"]
    names = sorted({t for n in products for t in (n.input[0], n.output[0])})
    ranges = calibrate_ranges(model_path, ids, names)
    out = {}
    for n in products:
        peak = max(ranges[n.input[0]], ranges[n.output[0]])
        if peak > FP16_MAX / RANGE_MARGIN:
            out[n.name] = round(peak, 1)
    return out


def narrow_graph(proto: onnx.ModelProto, recipe: NarrowRecipe, keep: dict[str, float] | None = None,
                 scratch: Path | None = None) -> dict:
    """Rewrite `proto` in place (see the module docstring). `keep`: fp16 product node
    names that stay fp32 (range_guard's verdict); `scratch`: a file for the large narrow
    tensors (lazy_weights.Initializers). Returns a summary: counts, the dtype of the tied
    embedding / LM head, and what was kept."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    candidates = _candidates(g, inits)
    if not any(n.op_type == "Gather" and n.input[0] == EMBED_WEIGHT for n in candidates):
        raise ExportError("the graph's embedding gather was not found; is this an fp32 artifact?")
    dtype_of = {id(n): recipe.head_dtype if _weight(n) == EMBED_WEIGHT else recipe.dtype for n in candidates}
    # The guard speaks for fp16 products only (bf16 has fp32's range).
    kept = {k: v for k, v in (keep or {}).items()
            if any(n.name == k and dtype_of[id(n)] == TensorProto.FLOAT16 for n in candidates)}
    # A weight read by a product kept fp32 (the tied head, say) stays fp32 for every reader.
    stay = {_weight(n) for n in candidates if n.name in kept}
    chosen = [n for n in candidates if _weight(n) not in stay]
    weights = {_weight(n): dtype_of[id(n)] for n in chosen}
    chosen_ids = {id(n) for n in chosen}

    casts: dict[tuple[str, int], str] = {}  # (fp32 tensor, dtype) -> its narrow copy, one Cast each
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if id(n) not in chosen_ids:
            nodes.append(n)
            continue
        dtype = dtype_of[id(n)]
        tag = _TAGS[dtype]
        out = n.output[0]
        narrow_out = f"{out}/{tag}"
        if n.op_type != "Gather":
            x = n.input[0]
            if (x, dtype) not in casts:
                casts[x, dtype] = f"{x}/as_{tag}"
                nodes.append(helper.make_node("Cast", [x], [casts[x, dtype]], name=f"{n.name}/Cast_in", to=dtype))
            n.input[0] = casts[x, dtype]
        n.output[0] = narrow_out
        nodes.append(n)
        nodes.append(helper.make_node("Cast", [narrow_out], [out], name=f"{n.name}/Cast_out", to=TensorProto.FLOAT))
    made = lazy_weights.Initializers(scratch)
    for i, t in enumerate(g.initializer):
        if t.name in weights:
            g.initializer[i].CopyFrom(narrow_tensor(t, weights[t.name], made))
    del g.node[:]
    g.node.extend(nodes)
    return {
        "products": sum(n.op_type != "Gather" for n in chosen),
        "embedding_and_lm_head": _TAGS[weights[EMBED_WEIGHT]] if EMBED_WEIGHT in weights else "fp32",
        "weights_narrowed": len(weights),
        "kept_fp32_products": kept,
    }


def cpu_fallback_graph(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The graph for ONNX Runtime's CPU provider: each fp16/bf16 MatMul/Gemm as
    Cast(fp32) inputs -> fp32 product -> Cast(back). Same initializers (and weights file).

    bf16: the CPU provider has no bf16 MatMul/Gemm at all. fp16: it runs them by casting
    to fp32 behind the graph's back and drops the rounding (a 1e5 product comes out finite),
    so CPU parity would not see what CUDA computes. Spelled out, both round inputs and
    output exactly as a narrow GEMM with fp32 accumulation does, overflow to inf included."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    narrow_of = {t.name: t.data_type for t in g.initializer if t.data_type in _TAGS}
    for n in g.node:
        to = [a.i for a in n.attribute if a.name == "to"]
        if n.op_type == "Cast" and to and to[0] in _TAGS:
            narrow_of[n.output[0]] = to[0]
    nodes, ups = [], {}
    for n in g.node:
        dt = narrow_of.get(n.input[0]) if n.op_type in ("MatMul", "Gemm") else None
        if dt is not None and narrow_of.get(n.input[1]) == dt:
            ins = []
            for k in (0, 1):
                t = n.input[k]
                if t not in ups:
                    ups[t] = f"{t}/fp32"
                    nodes.append(helper.make_node("Cast", [t], [ups[t]], name=f"{n.name}/Cast_fp32_{k}",
                                                  to=TensorProto.FLOAT))
                ins.append(ups[t])
            prod = f"{n.output[0]}/fp32"
            nodes.append(helper.make_node(n.op_type, ins + list(n.input[2:]), [prod], name=n.name,
                                          **{a.name: helper.get_attribute_value(a) for a in n.attribute}))
            nodes.append(helper.make_node("Cast", [prod], [n.output[0]], name=f"{n.name}/Cast_{_TAGS[dt]}", to=dt))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return out
