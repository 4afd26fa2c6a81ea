"""Weight-only quantization recipes and the graph rewrite that applies them to an fp32 graph.

    quantize_graph(proto, recipe, gguf_path, progress, moments) -> summary   (in place)
    dequantized_weights(proto) -> {checkpoint name: fp32 [N, K]}             (reading it back)

Recipes (each records itself and its parameters in the manifest):
  int8   block-wise int8 (round to nearest), symmetric; every MatMul, the LM head and the
         embedding gather.
  int4   block-wise int4, asymmetric by default (symmetric selectable), same coverage;
         GPTQ rounding of the decoder's products by default (`gptq_blocks`, calibrated on
         text the model samples), round to nearest for the tied embedding / LM head.
         Asymmetric and GPTQ because each keeps more corpus top-1 agreement on Gemma 3
         270M (measured in docs/design.md).
  int8 and gguf take their products' outlier input channels out of the int8 activation
         rounding (rewrites/outlier_channels.py, chosen on text the model samples) and
         recompute the LM head's largest logits in fp32 (rewrites/exact_head.py).
  gguf   the blocks a GGUF source already holds (Q8_0, Q5_0, Q6_K, Q4_K), carried into
         MatMulNBits / GatherBlockQuantized without a second rounding: the artifact
         computes what the GGUF computes. Re-rounding already-quantized weights onto
         another grid is what costs the peers their int4 quality on Gemma 3 270M.

Every graph change is the same two moves:

    MatMul(A, W[K,N]) / Gemm(A, E, transB=1)  ->  MatMulNBits(A, Bq[N,kb,blob], scales, zp)
    Gather(E, ids)                              ->  GatherBlockQuantized(Bq, ids, scales3, zp3)
                                                    -> Reshape[..., H]

The tied embedding is quantized once: the gather and the LM head read the same `Bq`
initializer (only the small scale tensors differ in shape). Everything else (norms,
softmax, residual stream, RoPE) stays fp32.

The block math is exporter/blocks.py (pure numpy), the GGUF block decoders
exporter/gguf_blocks.py; this module owns the recipes, where each weight's blocks come
from, and the graph rewrite.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from gemma_export.contract import EMBED_WEIGHT, PLE_WEIGHT
from gemma_export.errors import ExportError
from gemma_export.exporter import lazy_weights
from gemma_export.exporter.blocks import (
    Blocks,
    gptq_factor,
    gptq_with_factor,
    pack,
    pack_zero_points,
    quantize_blocks,
    unpack,
)
from gemma_export.exporter.gguf_blocks import gguf_blocks
from gemma_export.exporter.rewrites import MS_DOMAIN, ensure_ms_opset
from gemma_export.exporter.rewrites.exact_head import EXACT_TOP_K, HEAD_NODE
from gemma_export.exporter.rewrites.pack_projections import packed_rows
from gemma_export.models.gguf_names import gguf_name



@dataclass(frozen=True)
class Recipe:
    name: str  # "int8" | "int4" | "gguf"
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    # MatMulNBits compute: 0 = as the input type (fp32), 4 = int8 activations (fastest on
    # CPUs with VNNI; quantizes A per block, a second small error on top of the weights').
    accuracy_level: int = 4
    # GPTQ rounding of the decoder's products, calibrated on `gptq_sequences` x
    # `gptq_length` tokens the fp32 model samples (calibrate.py). The tied embedding / LM
    # head is always rounded to nearest: the gather reads the same codes, and GPTQ tuned to
    # the head's inputs cost the gather more than it gained (measured on the 270M).
    gptq: bool = False
    gptq_sequences: int = 16
    gptq_length: int = 128
    gptq_seed: int = 0
    # Outlier input channels kept out of the int8 activation rounding
    # (rewrites/outlier_channels.py): a channel whose peak |x|, over `outlier_sequences` x
    # `outlier_length` tokens the fp32 model samples (seed `gptq_seed`), passes
    # `outlier_ratio` times the median peak of its block of 32 is computed in fp32 beside
    # the MatMulNBits. 0: none. Only matters at accuracy_level 4.
    outlier_ratio: float = 0.0
    outlier_sequences: int = 8
    outlier_length: int = 128
    # MatMulNBits' block length for the products: coarser blocks (the rounding's, GGUF's
    # Q8_0 / Q4_K 32) are split exactly (same codes, scales repeated). At accuracy_level 4
    # it is also the length of each int8 activation block, so a finer grid for the
    # activations. 0: the blocks as rounded / as in the file.
    activation_block: int = 0
    # The LM head's `exact_top_k` largest logits recomputed in fp32 from the same codes
    # (rewrites/exact_head.py), the head's input then keeping all its channels in the
    # rounding (no outlier split). 0: none. Only matters at accuracy_level 4.
    exact_top_k: int = 0

    @property
    def outlier_block(self) -> int:
        """The activation block an outlier channel is judged against."""
        return self.activation_block or 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECIPES = {
    # int8 / gguf: the LM head's 16 largest logits recomputed in fp32, and the decoder's
    # outlier channels beyond 4x their block's median peak computed in fp32 (measured on the
    # held-out texts and for speed, docs/design.md); int4's miss is its weights.
    "int8": Recipe("int8", bits=8, block_size=32, symmetric=True, accuracy_level=4, outlier_ratio=4.0,
                   exact_top_k=16),
    "int4": Recipe("int4", bits=4, block_size=32, symmetric=False, accuracy_level=4, gptq=True),
    "gguf": Recipe("gguf", bits=0, block_size=0, symmetric=False, accuracy_level=4, outlier_ratio=4.0,
                   exact_top_k=16),
}


class _Source:
    """Where a weight's Blocks come from: rounding (int8/int4) or the GGUF file."""

    def __init__(self, recipe: Recipe, gguf_path: Path | None):
        self.recipe = recipe
        self.tensors = {}
        self.zero_scale_blocks = 0
        self.factors: dict[str, np.ndarray] = {}
        self.gptq_products = 0
        if recipe.name == "gguf":
            if gguf_path is None:
                raise ExportError("--precision gguf needs an artifact exported from a GGUF file")
            import gguf

            reader = gguf.GGUFReader(str(gguf_path))
            self.tensors = {t.name: t for t in reader.tensors}

    def blocks(self, name: str, shape: tuple[int, int], weight, moments=None, input_name: str | None = None) -> Blocks:
        """The Blocks of weight `name` [N, K] = `shape`; `weight()` gives its fp32 values,
        read only where the recipe rounds them (the gguf recipe reads the file's blocks,
        so a 262144 x 640 embedding is never expanded for it). `moments.get(input_name)`:
        sum x x^T of the product's input, for GPTQ (absent: round to nearest)."""
        r = self.recipe
        if r.name != "gguf":
            w_nk = weight()
            h = moments.get(input_name) if moments is not None else None
            if h is not None:
                if input_name not in self.factors:
                    self.factors = {input_name: gptq_factor(h)}  # inputs come in graph order
                self.gptq_products += 1
                return gptq_with_factor(w_nk, self.factors[input_name], r.bits, r.block_size, r.symmetric)
            return quantize_blocks(w_nk, r.bits, r.block_size, r.symmetric)
        gname = gguf_name(name.replace(".MatMul.weight", ".weight"))  # artifact name -> checkpoint name
        t = self.tensors.get(gname) if gname else None
        if t is None:
            raise ExportError(f"--precision gguf: no GGUF tensor for {name}")
        b = gguf_blocks(np.asarray(t.data).view(np.uint8), t.tensor_type.name, *shape)
        if b is None:  # F32/F16/other: fall back to exact 8-bit rounding of this tensor
            b = quantize_blocks(weight(), 8, 32, True)
        if b.zero_points.dtype == np.float32:
            self.zero_scale_blocks += int((b.scales == 0).sum())
        return b


def _matmulnbits(name: str, a: str, out: str, b: Blocks, prefix: str, inits: lazy_weights.Initializers,
                 level: int) -> list[onnx.NodeProto]:
    """Nodes computing out = a @ dequantize(b).T.

    Float zero points (GGUF K-quants: w = scale*q - min) put MatMulNBits on a path about
    60x slower than integer ones on CPU. So those run as integer codes around the kernel's
    default zero point m = 2**(bits-1), plus an exact per-block correction:
    w = scale*(q - m) + scale*(m - z), hence a . w = MatMulNBits(a) + sum_b c_b * sum_{i in b} a_i
    with c_b = scale_b * (m - z_b). Centring on m keeps the int8-activation kernel's error
    as small as for ordinary symmetric codes.

        a ─ MatMulNBits(codes, scales) ───────────────────────── Add ─ out
        a ─ Reshape[.., kb, bs] ─ ReduceSum(-1) ─ MatMul(c^T) ──┘
    """
    n, kb, bs = b.codes.shape
    inits.add(pack(b.codes, b.bits), f"{prefix}.qweight")
    inits.add(b.scales.reshape(n, kb).astype(np.float32), f"{prefix}.scales")
    inputs = [a, f"{prefix}.qweight", f"{prefix}.scales"]
    float_zp = b.zero_points.dtype == np.float32
    if not float_zp and not b.default_zero_point:
        inits.add(pack_zero_points(b.zero_points, b.bits), f"{prefix}.zero_points")
        inputs.append(f"{prefix}.zero_points")
    attrs = dict(K=kb * bs, N=n, bits=b.bits, block_size=bs, accuracy_level=level)
    if not float_zp:
        return [helper.make_node("MatMulNBits", inputs, [out], name=name, domain=MS_DOMAIN, **attrs)]
    mid = 2 ** (b.bits - 1)
    corr_w = (b.scales * (mid - b.zero_points)).astype(np.float32)  # [N, kb]
    base = name.rsplit("/", 1)[0]
    inits.add(np.ascontiguousarray(corr_w.T), f"{prefix}.block_offsets")  # [kb, N]
    inits.add(np.array([-1, kb, bs], np.int64), f"{prefix}.block_shape")
    inits.add(np.array([-1], np.int64), f"{prefix}.last_axis")
    scaled, sums, flat, corr = (f"{out}/{t}" for t in ("centred", "block_sums", "blocks", "offset"))
    return [
        helper.make_node("MatMulNBits", inputs, [scaled], name=name, domain=MS_DOMAIN, **attrs),
        helper.make_node("Reshape", [a, f"{prefix}.block_shape"], [flat], name=f"{base}/BlockReshape"),
        helper.make_node("ReduceSum", [flat, f"{prefix}.last_axis"], [sums], name=f"{base}/BlockSum", keepdims=0),
        helper.make_node("MatMul", [sums, f"{prefix}.block_offsets"], [f"{corr}2d"], name=f"{base}/OffsetMatMul"),
        helper.make_node("Shape", [scaled], [f"{corr}/shape"], name=f"{base}/OffsetShape"),
        helper.make_node("Reshape", [f"{corr}2d", f"{corr}/shape"], [corr], name=f"{base}/OffsetReshape"),
        helper.make_node("Add", [scaled, corr], [out], name=f"{base}/OffsetAdd"),
    ]


def quantize_graph(proto: onnx.ModelProto, recipe: Recipe, gguf_path: Path | None = None, progress=None,
                   moments=None, scratch: Path | None = None) -> dict:
    """Rewrite `proto` in place; returns a summary (counts, bits per weight). `moments`
    (`.get(input tensor)` -> sum x x^T or None: calibrate.InputMoments over
    `product_inputs`) turns on GPTQ for the products whose input it covers. `scratch`: a
    file for the large tensors made (lazy_weights.Initializers), else all in memory."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    src = _Source(recipe, gguf_path)
    new_inits = lazy_weights.Initializers(scratch)
    drop: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    summary = {"matmuls": 0, "lm_head": False, "embedding": False, "bits": {}}
    embed_blocks: Blocks | None = None
    targets = sum(_kind(n, inits) is not None for n in g.node)
    embed_weight = partial(_array, inits, EMBED_WEIGHT)  # [V, H] = [N, K] already; read only if asked

    def embed() -> Blocks:
        # Split like the products: the gather reads the LM head's codes tensor, whose shape
        # [V, kb, bs] both ops must agree on.
        b = src.blocks(EMBED_WEIGHT, tuple(inits[EMBED_WEIGHT].dims), embed_weight)
        return b.split(recipe.activation_block or b.block_size)
    done = 0
    for node in g.node:
        kind = _kind(node, inits)
        if kind == "matmul":
            wname = node.input[1]
            k, n = inits[wname].dims  # the exporter stores [K, N]; blocks run along K
            b = src.blocks(wname, (n, k), lambda wname=wname: _array(inits, wname).T, moments, node.input[0])
            b = b.split(recipe.activation_block or b.block_size)
            prefix = wname[: -len(".weight")]
            nodes.extend(_matmulnbits(node.name.replace("/MatMul", "/MatMulNBits"), node.input[0], node.output[0],
                                      b, prefix, new_inits, recipe.accuracy_level))
            drop.add(wname)
            summary["matmuls"] += 1
            summary["bits"][wname] = [b.bits, b.block_size]
        elif kind == "lm_head":
            embed_blocks = embed_blocks or embed()
            nodes.extend(_lm_head(node, embed_blocks, new_inits, recipe.accuracy_level))
            summary["lm_head"] = True
        elif kind == "embedding":
            embed_blocks = embed_blocks or embed()
            nodes.extend(_embedding(node, embed_blocks, new_inits))
            summary["embedding"] = True
        elif kind == "ple":
            # Gemma 4's PLE table (E2B: 262144 x 8960, larger than the rest of the model):
            # gathered only, so it is stored once as GatherBlockQuantized codes, rounded to
            # nearest at the recipe's bits (no product input to calibrate GPTQ on).
            b = src.blocks(PLE_WEIGHT, tuple(inits[PLE_WEIGHT].dims), partial(_array, inits, PLE_WEIGHT))
            nodes.extend(_embedding(node, b, new_inits, _PLE_PREFIX, with_codes=True))
            drop.add(PLE_WEIGHT)
            summary["bits"][PLE_WEIGHT] = [b.bits, b.block_size]
        elif kind == "experts":
            # Gemma 4's MoE tables [E, R, K], gathered per token by the router's picks: the
            # same codes along K as a product's, read back by GatherBlockQuantized.
            w = node.input[0]
            e, r, k = inits[w].dims
            b = src.blocks(w, (e * r, k), lambda w=w, n=e * r, k=k: _array(inits, w).reshape(n, k))
            b = b.split(recipe.activation_block or b.block_size)
            nodes.extend(_experts(node, b, e, new_inits))
            drop.add(w)
            summary["bits"][w] = [b.bits, b.block_size]
        else:
            nodes.append(node)
            continue
        done += 1
        if progress is not None:
            progress.count("quantizing", done, targets)
    if not (summary["lm_head"] and summary["embedding"]):
        raise ExportError("the graph's tied embedding (Gather + Gemm) was not found; is this an fp32 artifact?")
    drop.add(EMBED_WEIGHT)
    if embed_blocks is not None:
        summary["bits"][EMBED_WEIGHT] = [embed_blocks.bits, embed_blocks.block_size]
    kept = [i for i in g.initializer if i.name not in drop]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)  # the embedding's codes are written once, by _lm_head
    del g.node[:]
    g.node.extend(nodes)
    ensure_ms_opset(proto)
    summary["gptq"] = src.gptq_products
    summary["gguf_zero_scale_blocks"] = src.zero_scale_blocks
    return summary


def _array(inits: dict, name: str) -> np.ndarray:
    return lazy_weights.array(inits[name])


def product_inputs(proto: onnx.ModelProto) -> dict[str, str]:
    """{input tensor: its layer} for the weight products `quantize_graph` rewrites (not the
    LM head), in graph order: what GPTQ needs second moments of."""
    inits = {i.name for i in proto.graph.initializer}
    out = {}
    for n in proto.graph.node:
        if _kind(n, inits) == "matmul":
            m = re.match(r"model\.layers\.(\d+)\.", n.input[1])
            out.setdefault(n.input[0], m.group(1) if m else n.input[1])
    return out


def rounded_inputs(proto: onnx.ModelProto) -> list[str]:
    """Every tensor a rewritten product reads (the decoder's products and the LM head),
    in graph order: what the int8 activation rounding of MatMulNBits sees."""
    inits = {i.name for i in proto.graph.initializer}
    out = list(product_inputs(proto))
    out += [n.input[0] for n in proto.graph.node if _kind(n, inits) == "lm_head" and n.input[0] not in out]
    return out


def product_table(proto: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """{MatMulNBits node: {"bits", "block_size", "accuracy_level", "outlier_channels"}} of a
    finished graph: the manifest's record of how each product computes; the LM head's entry
    also says how many of its largest logits are recomputed in fp32 ("exact_top_k")."""
    inits = {i.name: i for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    out = {}
    for n in proto.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: x.i for x in n.attribute}
        keep = producers.get(n.input[0])
        outliers = 0
        if keep is not None and keep.name.endswith("/OutlierKeep"):
            outliers = int((lazy_weights.array(inits[keep.input[1]]) == 0).sum())
        out[n.name] = {"bits": a["bits"], "block_size": a["block_size"], "accuracy_level": a.get("accuracy_level", 0),
                       "outlier_channels": outliers}
    k = inits.get(EXACT_TOP_K)
    if k is not None and HEAD_NODE in out:
        out[HEAD_NODE]["exact_top_k"] = int(lazy_weights.array(k)[0])
    return out


def _kind(node: onnx.NodeProto, inits) -> str | None:
    """Which rewrite a node gets: a weight MatMul, the tied LM head, the embedding gather."""
    if node.op_type == "MatMul" and node.input[1] in inits and node.input[1].endswith(".MatMul.weight"):
        return "matmul"
    if node.op_type == "Gemm" and node.input[1] == EMBED_WEIGHT:
        return "lm_head"
    if node.op_type == "Gather" and node.input[0] == EMBED_WEIGHT:
        return "embedding"
    if node.op_type == "Gather" and node.input[0] == PLE_WEIGHT:
        return "ple"
    if node.op_type == "GatherND" and node.input[0] in inits and node.input[0].endswith(_EXPERT_TABLES):
        return "experts"
    return None


_EXPERT_TABLES = (".experts.gate_up_proj", ".experts.down_proj")


_EMBED_PREFIX = "model.embed_tokens"
_PLE_PREFIX = "model.embed_tokens_per_layer"


def _lm_head(node: onnx.NodeProto, b: Blocks, inits: lazy_weights.Initializers, level: int) -> list[onnx.NodeProto]:
    """Gemm(h2d, E, transB=1) reads E as [V, H] = [N, K]: exactly MatMulNBits' layout."""
    assert any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return _matmulnbits(HEAD_NODE, node.input[0], node.output[0], b, _EMBED_PREFIX, inits, level)


def _embedding(node: onnx.NodeProto, b: Blocks, inits: lazy_weights.Initializers, p: str = _EMBED_PREFIX,
               with_codes: bool = False) -> list[onnx.NodeProto]:
    """Gather -> GatherBlockQuantized over the same packed codes, then Reshape
    [B, S, kb, bs] -> [B, S, H]. The tied embedding's codes are written by the LM head's
    MatMulNBits ([V, kb, blob], the layout `_gathered` reads); `with_codes` writes them
    here (a table nothing else reads: the PLE)."""
    v, kb, bs = b.codes.shape
    return _gathered(b, v, node.input[1], node.output[0], [0, 0, kb * bs], p, "/" + p.replace(".", "/"), inits,
                     with_codes)


def _experts(node: onnx.NodeProto, b: Blocks, e: int, inits: lazy_weights.Initializers) -> list[onnx.NodeProto]:
    """GatherND(table [E, R, K], picks [N, k, 1]) -> [N, k, R, K] as GatherBlockQuantized
    over the table's codes (`_gathered`, E tables of R * kb blocks) on the picks without
    their last axis, then Reshape."""
    rk, kb, bs = b.codes.shape
    p = node.input[0]
    scope = f"{node.name.rsplit('/', 1)[0]}/{'gate_up' if p.endswith('gate_up_proj') else 'down'}"
    picks = f"{node.output[0]}/picks"
    nodes = _gathered(b, e, picks, node.output[0], [0, 0, rk // e, kb * bs], p, scope, inits, with_codes=True)
    inits.add(np.array([-1], np.int64), f"{p}.last_axis")
    squeeze = helper.make_node("Squeeze", [node.input[1], f"{p}.last_axis"], [picks], name=f"{scope}/Squeeze")
    return [squeeze, *nodes]


def _gathered(b: Blocks, tables: int, indices: str, out: str, shape: list[int], p: str, scope: str,
              inits: lazy_weights.Initializers, with_codes: bool) -> list[onnx.NodeProto]:
    """out = Reshape(GatherBlockQuantized(codes, indices), shape): b's rows as `tables`
    entries of [rows / tables * kb, blob] codes, gathered along axis 0 and quantized along
    axis 2 (one block per row of it, scales and zero points [.., 1]); `shape`'s zeros copy
    the leading dims. `with_codes` writes the codes as `{p}.qweight` (else they are there)."""
    n, kb, bs = b.codes.shape
    m = n // tables * kb
    if with_codes:
        inits.add(pack(b.codes, b.bits).reshape(tables, m, -1), f"{p}.qweight")
    inits.add(b.scales.reshape(tables, m, 1).astype(np.float32), f"{p}.gather_scales")
    inputs = [f"{p}.qweight", indices, f"{p}.gather_scales"]
    if not b.default_zero_point:
        if b.zero_points.dtype != np.uint8:
            raise ExportError(f"{p}: float zero points (GGUF K-quant blocks) cannot be gathered by "
                              "GatherBlockQuantized")
        # one zero point per byte (low nibble for 4 bits): the quantized axis has length 1
        inits.add(b.zero_points.reshape(tables, m, 1), f"{p}.gather_zero_points")
        inputs.append(f"{p}.gather_zero_points")
    inits.add(np.array(shape, np.int64), f"{p}.gather_shape")
    mid = f"{out}/blocks"
    return [
        helper.make_node("GatherBlockQuantized", inputs, [mid], name=f"{scope}/GatherBlockQuantized",
                         domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=bs, bits=b.bits),
        helper.make_node("Reshape", [mid, f"{p}.gather_shape"], [out], name=f"{scope}/Reshape"),
    ]


def dequantized_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Checkpoint-named fp32 weights [N, K] that the MatMulNBits nodes of `proto` compute
    with, e.g. {"model.layers.0.self_attn.q_proj.weight": ..., "model.embed_tokens.weight": ...}.
    Loading them into the PyTorch model gives the recipe's own reference: what the
    artifact must match up to arithmetic, separately from what quantization costs."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "GatherBlockQuantized" and node.input[0] == f"{_PLE_PREFIX}.qweight":
            out[PLE_WEIGHT] = _gathered_table(node, inits)
        if node.op_type == "GatherBlockQuantized" and node.input[0].endswith(tuple(f"{t}.qweight"
                                                                                  for t in _EXPERT_TABLES)):
            name = node.input[0][: -len(".qweight")]
            shape = lazy_weights.array(inits[f"{name}.gather_shape"])
            e = inits[node.input[0]].dims[0]
            out[name] = _gathered_table(node, inits).reshape(e, int(shape[2]), int(shape[3]))
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        bits, bs, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
        kb = k // bs
        codes = unpack(lazy_weights.array(inits[node.input[1]]), bits, bs)
        scales = lazy_weights.array(inits[node.input[2]]).reshape(n, kb)
        if len(node.input) > 3 and node.input[3]:
            zp = lazy_weights.array(inits[node.input[3]])
            if zp.dtype == np.uint8 and bits == 4:
                zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :kb]
            zp = zp.reshape(n, kb)
        else:
            zp = np.full((n, kb), 2 ** (bits - 1), np.uint8)
        w = Blocks(codes, scales, zp, bits).dequantize()
        # A packed projection (rewrites/pack_projections) holds several weights' rows.
        members = packed_rows(node) or [(node.input[1], n)]
        start = 0
        for qweight, rows in members:
            part, start = w[start:start + rows], start + rows
            prefix = qweight[: -len(".qweight")]
            if f"{prefix}.block_offsets" in inits:  # float-zero-point blocks (see _matmulnbits)
                offsets = lazy_weights.array(inits[f"{prefix}.block_offsets"]).T  # [N, kb]
                part = (part.reshape(rows, kb, bs) + offsets[..., None]).reshape(rows, k)
            name = prefix[: -len(".MatMul")] + ".weight" if prefix.endswith(".MatMul") else prefix + ".weight"
            out[name] = part
    return out


def _gathered_table(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    """The fp32 table [V, K] a GatherBlockQuantized of `_gathered` reads ([V, kb, blob] codes)."""
    attrs = {a.name: a.i for a in node.attribute}
    bits, bs = attrs["bits"], attrs["block_size"]
    codes = unpack(lazy_weights.array(inits[node.input[0]]), bits, bs)  # [V, kb, bs]
    v, kb = codes.shape[:2]
    scales = lazy_weights.array(inits[node.input[2]]).reshape(v, kb)
    if len(node.input) > 3 and node.input[3]:
        zp = lazy_weights.array(inits[node.input[3]]).reshape(v, kb)
        if bits == 4:
            zp = zp & 0x0F  # one zero point per byte, in the low nibble (see _embedding)
    else:
        zp = np.full((v, kb), 2 ** (bits - 1), np.uint8)
    return Blocks(codes, scales, zp, bits).dequantize()
