"""Weight-only quantization recipes: pure transformations of the fp32 artifact.

    quantize_artifact(src_dir, out_dir, recipe)

Recipes (each records itself and its parameters in the manifest):
  int8   block-wise int8 (round to nearest), symmetric; every MatMul, the LM head and the
         embedding gather.
  int4   block-wise int4, asymmetric by default (symmetric selectable), same coverage;
         GPTQ rounding of the decoder's products by default (`gptq_blocks`, calibrated on
         text the model samples), round to nearest for the tied embedding / LM head.
         On Gemma 3 270M (round to nearest) asymmetric keeps 65% corpus top-1 agreement where
         symmetric keeps 54%; GPTQ takes asymmetric to 67%.
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

The quantization math is pure numpy functions below, apart from the graph rewrite.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from gemma_export.errors import ExportError
from gemma_export.exporter.rewrites import MS_DOMAIN, ensure_ms_opset
from gemma_export.exporter.rewrites.pack_projections import PACKED_DOC

EMBED = "model.embed_tokens.weight"


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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


RECIPES = {
    "int8": Recipe("int8", bits=8, block_size=32, symmetric=True, accuracy_level=4),
    "int4": Recipe("int4", bits=4, block_size=32, symmetric=False, accuracy_level=4, gptq=True),
    "gguf": Recipe("gguf", bits=0, block_size=0, symmetric=False, accuracy_level=4),
}


# -- quantization math (pure) ------------------------------------------------------------------


@dataclass
class Blocks:
    """W[N, K] as codes [N, kb, bs] (uint8, each < 2**bits), scales [N, kb] fp32 and zero
    points [N, kb] (uint8, or fp32 for GGUF K-quants): W = scales * (codes - zero_points)."""

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int

    @property
    def block_size(self) -> int:
        return self.codes.shape[2]

    def dequantize(self) -> np.ndarray:
        w = (self.codes.astype(np.float32) - self.zero_points.astype(np.float32)[..., None]) * self.scales[..., None]
        return w.reshape(self.codes.shape[0], -1)

    @property
    def default_zero_point(self) -> bool:
        """MatMulNBits' implicit zero point (2**(bits-1)) everywhere: the input can be omitted."""
        zp = self.zero_points
        return zp.dtype == np.uint8 and bool(np.all(zp == 2 ** (self.bits - 1)))


ROWS_AT_ONCE = 1 << 22  # elements of W rounded per pass: the temporaries stay ~16 MB each


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> Blocks:
    """Round-to-nearest block quantization of w [N, K] along K. Rows are independent, so
    they are rounded a slab at a time: a 262144 x 640 embedding would otherwise hold
    several fp32 temporaries of its own size at once (measured: int8 quantize of the 270M
    peaked at 3.9 GB RSS, for a 1.08 GB model)."""
    n, k = w.shape
    kb = _block_count(k, block_size)
    codes = np.empty((n, kb, block_size), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.uint8)
    step = max(1, ROWS_AT_ONCE // k)
    for r0 in range(0, n, step):
        x = _as_blocks(w[r0:r0 + step], block_size)
        s, z = _block_params(x, bits, symmetric)
        codes[r0:r0 + step], scales[r0:r0 + step], zps[r0:r0 + step] = _round(x, s[..., None], z[..., None], bits), s, z
    return Blocks(codes, scales, zps, bits)


def _as_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    n, k = w.shape
    return w.astype(np.float32).reshape(n, _block_count(k, block_size), block_size)


def _block_count(k: int, block_size: int) -> int:
    if k % block_size:
        raise ExportError(f"K={k} is not a multiple of block size {block_size}")
    return k // block_size


def _block_params(x: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales (fp32) and uint8 zero points for blocks x [..., bs].

    Symmetric: codes in [0, qmax] around the midpoint 2**(bits-1), the scale mapping the
    largest |w| to -2**(bits-1) (the wider negative side), as MatMulNBits' default.
    Asymmetric: [min(w, 0), max(w, 0)] spread over [0, qmax] with an integer zero point."""
    qmax = 2**bits - 1
    if symmetric:
        mid = 2 ** (bits - 1)
        scales = (np.abs(x).max(-1) / mid).astype(np.float32)
        return scales, np.full(scales.shape, mid, np.uint8)
    lo = np.minimum(x.min(-1), 0.0)
    hi = np.maximum(x.max(-1), 0.0)
    scales = ((hi - lo) / qmax).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales)
    return scales, np.clip(np.rint(-lo / safe), 0, qmax).astype(np.uint8)


def _round(x: np.ndarray, scales: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Nearest codes for x given broadcastable scales and zero points."""
    safe = np.where(scales == 0, 1.0, scales)
    return np.clip(np.rint(x / safe) + zp, 0, 2**bits - 1).astype(np.uint8)


def gptq_blocks(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool = True,
                damp: float = 0.01) -> Blocks:
    """GPTQ (Frantar et al., 2022) block quantization of w [N, K] along K, for inputs whose
    second moment is h = sum x x^T [K, K].

    Columns are rounded one at a time, left to right; each one's rounding error, divided
    by the diagonal of the Cholesky factor of H^-1, is spread over the columns not yet
    rounded, so that x . w moves as little as possible on inputs like the calibration's
    (RTN minimises the error of w itself). A block's scale and zero point are taken, as
    in RTN, from its columns as they stand when the block is reached. `damp` adds that
    fraction of H's mean diagonal to H (numerical safety; input channels that never fire
    get weight error nobody sees).
    """
    return gptq_with_factor(w, gptq_factor(h, damp), bits, block_size, symmetric)


def gptq_factor(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """U, the upper Cholesky factor of (H + damp * mean(diag H) I)^-1 (H^-1 = U^T U): row i
    holds how column i's error moves the columns after it. One per input, shared by the
    products that read it (q/k/v, gate/up)."""
    k = h.shape[0]
    H = np.array(h, np.float64, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H[np.diag_indices(k)] += damp * float(np.mean(np.diag(H)))
    hinv = np.linalg.inv(np.linalg.cholesky(H))
    return np.linalg.cholesky(hinv.T @ hinv).T


def gptq_with_factor(w: np.ndarray, U: np.ndarray, bits: int, block_size: int, symmetric: bool) -> Blocks:
    """`gptq_blocks` given its input's factor U (`gptq_factor`)."""
    n, k = w.shape
    kb = _block_count(k, block_size)
    W = w.astype(np.float64)
    codes = np.empty((n, k), np.uint8)
    scales = np.empty((n, kb), np.float32)
    zps = np.empty((n, kb), np.uint8)
    for b0 in range(0, k, block_size):
        b1 = b0 + block_size
        s, z = _block_params(W[:, b0:b1].astype(np.float32), bits, symmetric)
        scales[:, b0 // block_size], zps[:, b0 // block_size] = s, z
        err = np.empty((n, block_size))
        for i in range(b0, b1):
            q = _round(W[:, i], s, z, bits)
            codes[:, i] = q
            e = (W[:, i] - (q.astype(np.float64) - z) * s) / U[i, i]
            W[:, i + 1:b1] -= np.outer(e, U[i, i + 1:b1])
            err[:, i - b0] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]  # the block's errors, carried onto the rest at once
    return Blocks(codes.reshape(n, kb, block_size), scales, zps, bits)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """[..., bs] codes -> [..., bs * bits / 8] bytes; 4-bit: element 2i in the low nibble."""
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8)
    assert bits == 4 and codes.shape[-1] % 2 == 0
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4), dtype=np.uint8)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' uint8 zero points [N, kb] -> [N * ceil(kb * bits / 8)]."""
    if bits == 8:
        return zp.reshape(-1)
    n, kb = zp.shape
    if kb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


# -- GGUF blocks (pure) ------------------------------------------------------------------------


def gguf_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> Blocks | None:
    """The GGUF tensor's own blocks as Blocks (None for a type we do not carry).
    `raw` is the tensor's bytes (uint8), rows of K values along which blocks run."""
    b = raw.reshape(-1)
    if qtype == "Q8_0":  # 34 bytes / 32: fp16 d, int8 x; w = d * x
        blk = b.reshape(-1, 34)
        d = blk[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        x = blk[:, 2:].copy().view(np.int8).astype(np.int16)
        codes = (x + 128).astype(np.uint8).reshape(n, k // 32, 32)
        return Blocks(codes, d.reshape(n, -1), np.full((n, k // 32), 128, np.uint8), 8)
    if qtype == "Q5_0":  # 22 bytes / 32: fp16 d, 4 bytes high bits, 16 bytes nibbles; w = d*(q-16)
        blk = b.reshape(-1, 22)
        d = blk[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
        qh = blk[:, 2:6].copy().view(np.uint32)[:, 0]
        qs = blk[:, 6:]
        lo = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # elements 0..15 low nibbles, 16..31 high
        hi = ((qh[:, None] >> np.arange(32, dtype=np.uint32)[None]) & 1).astype(np.uint8)
        codes = (lo | (hi << 4)).astype(np.uint8).reshape(n, k // 32, 32)
        return Blocks(codes, d.reshape(n, -1), np.full((n, k // 32), 16, np.uint8), 8)
    if qtype == "Q6_K":  # 210 bytes / 256: ql 128, qh 64, int8 scales 16, fp16 d; w = d*sc*(q-32)
        blk = b.reshape(-1, 210)
        ql, qh = blk[:, :128], blk[:, 128:192]
        sc = blk[:, 192:208].copy().view(np.int8).astype(np.float32)
        d = blk[:, 208:210].copy().view(np.float16).astype(np.float32)
        ql = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        ql = ql.reshape(-1, 2, 128)
        qh = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
        qh = qh.reshape(-1, 2, 128)
        q = (ql | (qh << 4)).astype(np.uint8).reshape(-1, 16, 16)
        return Blocks(q.reshape(n, k // 16, 16), (d * sc).reshape(n, -1), np.full((n, k // 16), 32, np.uint8), 8)
    if qtype == "Q4_K":  # 144 bytes / 256: fp16 d, dmin, 12 bytes 6-bit scales/mins, 128 nibbles
        blk = b.reshape(-1, 144)
        d = blk[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = blk[:, 2:4].copy().view(np.float16).astype(np.float32)
        s = blk[:, 4:16].reshape(-1, 3, 4)
        sd, sm, smd = s[:, 0], s[:, 1], s[:, 2]
        sc = np.concatenate([sd & 0x3F, (smd & 0x0F) | ((sd >> 2) & 0x30)], axis=-1).astype(np.float32)
        mn = np.concatenate([sm & 0x3F, (smd >> 4) | ((sm >> 2) & 0x30)], axis=-1).astype(np.float32)
        qs = blk[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(-1, 8, 32).astype(np.uint8)
        scale = d * sc  # (nb, 8)
        dm = dmin * mn
        # w = scale*q - dm = scale*(q - dm/scale): a float zero point. A sub-block with
        # scale 0 is the constant -dm, which no zero point can express; there we keep
        # zp = 0 (w = 0), counted and reported by the caller.
        zp = np.where(scale != 0, dm / np.where(scale == 0, 1.0, scale), 0.0).astype(np.float32)
        return Blocks(q.reshape(n, k // 32, 32), scale.reshape(n, -1), zp.reshape(n, -1), 4)
    return None


# -- the graph rewrite ---------------------------------------------------------------------------

# Artifact weight name -> GGUF tensor name (inverse of models/load.py's table).
_GGUF_PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(weight: str) -> str | None:
    if weight == EMBED:
        return "token_embd.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.MatMul\.weight", weight)
    if m and m.group(2) in _GGUF_PARTS:
        return f"blk.{m.group(1)}.{_GGUF_PARTS[m.group(2)]}.weight"
    return None


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
        gname = gguf_name(name)
        t = self.tensors.get(gname) if gname else None
        if t is None:
            raise ExportError(f"--precision gguf: no GGUF tensor for {name}")
        b = gguf_blocks(np.asarray(t.data).view(np.uint8), t.tensor_type.name, *shape)
        if b is None:  # F32/F16/other: fall back to exact 8-bit rounding of this tensor
            b = quantize_blocks(weight(), 8, 32, True)
        if b.zero_points.dtype == np.float32:
            self.zero_scale_blocks += int((b.scales == 0).sum())
        return b


def _matmulnbits(name: str, a: str, out: str, b: Blocks, prefix: str, inits: list, level: int) -> list[onnx.NodeProto]:
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
    inits.append(numpy_helper.from_array(pack(b.codes, b.bits), f"{prefix}.qweight"))
    inits.append(numpy_helper.from_array(b.scales.reshape(n, kb).astype(np.float32), f"{prefix}.scales"))
    inputs = [a, f"{prefix}.qweight", f"{prefix}.scales"]
    float_zp = b.zero_points.dtype == np.float32
    if not float_zp and not b.default_zero_point:
        inits.append(numpy_helper.from_array(pack_zero_points(b.zero_points, b.bits), f"{prefix}.zero_points"))
        inputs.append(f"{prefix}.zero_points")
    attrs = dict(K=kb * bs, N=n, bits=b.bits, block_size=bs, accuracy_level=level)
    if not float_zp:
        return [helper.make_node("MatMulNBits", inputs, [out], name=name, domain=MS_DOMAIN, **attrs)]
    mid = 2 ** (b.bits - 1)
    corr_w = (b.scales * (mid - b.zero_points)).astype(np.float32)  # [N, kb]
    base = name.rsplit("/", 1)[0]
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(corr_w.T), f"{prefix}.block_offsets"),  # [kb, N]
        numpy_helper.from_array(np.array([-1, kb, bs], np.int64), f"{prefix}.block_shape"),
        numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}.last_axis"),
    ]
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
                   moments=None) -> dict:
    """Rewrite `proto` in place; returns a summary (counts, bits per weight). `moments`
    (`.get(input tensor)` -> sum x x^T or None: calibrate.InputMoments over
    `product_inputs`) turns on GPTQ for the products whose input it covers."""
    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    src = _Source(recipe, gguf_path)
    new_inits: list[onnx.TensorProto] = []
    drop: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    summary = {"matmuls": 0, "lm_head": False, "embedding": False, "bits": {}}
    embed_blocks: Blocks | None = None
    targets = sum(_kind(n, inits) is not None for n in g.node)
    embed_weight = partial(_array, inits, EMBED)  # [V, H] = [N, K] already; read only if asked
    done = 0
    for node in g.node:
        kind = _kind(node, inits)
        if kind == "matmul":
            wname = node.input[1]
            k, n = inits[wname].dims  # the exporter stores [K, N]; blocks run along K
            b = src.blocks(wname, (n, k), lambda: _array(inits, wname).T, moments, node.input[0])
            prefix = wname[: -len(".weight")]
            nodes.extend(_matmulnbits(node.name.replace("/MatMul", "/MatMulNBits"), node.input[0], node.output[0],
                                      b, prefix, new_inits, recipe.accuracy_level))
            drop.add(wname)
            summary["matmuls"] += 1
            summary["bits"][wname] = [b.bits, b.block_size]
        elif kind == "lm_head":
            embed_blocks = embed_blocks or src.blocks(EMBED, tuple(inits[EMBED].dims), embed_weight)
            nodes.extend(_lm_head(node, embed_blocks, new_inits, recipe.accuracy_level))
            summary["lm_head"] = True
        elif kind == "embedding":
            embed_blocks = embed_blocks or src.blocks(EMBED, tuple(inits[EMBED].dims), embed_weight)
            nodes.extend(_embedding(node, embed_blocks, new_inits))
            summary["embedding"] = True
        else:
            nodes.append(node)
            continue
        done += 1
        if progress is not None:
            progress.count("quantizing", done, targets)
    if not (summary["lm_head"] and summary["embedding"]):
        raise ExportError("the graph's tied embedding (Gather + Gemm) was not found; is this an fp32 artifact?")
    drop.add(EMBED)
    if embed_blocks is not None:
        summary["bits"][EMBED] = [embed_blocks.bits, embed_blocks.block_size]
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
    return numpy_helper.to_array(inits[name])


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


def _kind(node: onnx.NodeProto, inits) -> str | None:
    """Which rewrite a node gets: a weight MatMul, the tied LM head, the embedding gather."""
    if node.op_type == "MatMul" and node.input[1] in inits and node.input[1].endswith(".MatMul.weight"):
        return "matmul"
    if node.op_type == "Gemm" and node.input[1] == EMBED:
        return "lm_head"
    if node.op_type == "Gather" and node.input[0] == EMBED:
        return "embedding"
    return None


_EMBED_PREFIX = "model.embed_tokens"


def _lm_head(node: onnx.NodeProto, b: Blocks, inits: list, level: int) -> list[onnx.NodeProto]:
    """Gemm(h2d, E, transB=1) reads E as [V, H] = [N, K]: exactly MatMulNBits' layout."""
    assert any(a.name == "transB" and a.i == 1 for a in node.attribute)
    return _matmulnbits("/lm_head/MatMulNBits", node.input[0], node.output[0], b, _EMBED_PREFIX, inits, level)


def _embedding(node: onnx.NodeProto, b: Blocks, inits: list) -> list[onnx.NodeProto]:
    """Gather -> GatherBlockQuantized over the same packed codes (read as [V, kb, blob],
    quantized along axis 2), then Reshape [B, S, kb, bs] -> [B, S, H]."""
    v, kb, bs = b.codes.shape
    p = _EMBED_PREFIX
    inits.append(numpy_helper.from_array(b.scales.reshape(v, kb, 1).astype(np.float32), f"{p}.gather_scales"))
    inputs = [f"{p}.qweight", node.input[1], f"{p}.gather_scales"]
    if not b.default_zero_point:
        if b.zero_points.dtype != np.uint8:
            raise ExportError("the embedding's zero points must be integers for GatherBlockQuantized")
        # one zero point per byte (low nibble for 4 bits): the quantized axis has length 1
        inits.append(numpy_helper.from_array(b.zero_points.reshape(v, kb, 1), f"{p}.gather_zero_points"))
        inputs.append(f"{p}.gather_zero_points")
    inits.append(numpy_helper.from_array(np.array([0, 0, kb * bs], np.int64), f"{p}.gather_shape"))
    mid = f"{node.output[0]}/blocks"
    return [
        helper.make_node("GatherBlockQuantized", inputs, [mid], name="/model/embed_tokens/GatherBlockQuantized",
                         domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=bs, bits=b.bits),
        helper.make_node("Reshape", [mid, f"{p}.gather_shape"], [node.output[0]], name="/model/embed_tokens/Reshape"),
    ]


# -- reading a quantized graph back (for checks) -------------------------------------------------


def unpack(packed: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Inverse of `pack`: [N, kb, blob] bytes -> [N, kb, bs] codes."""
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (block_size,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def dequantized_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Checkpoint-named fp32 weights [N, K] that the MatMulNBits nodes of `proto` compute
    with, e.g. {"model.layers.0.self_attn.q_proj.weight": ..., "model.embed_tokens.weight": ...}.
    Loading them into the PyTorch model gives the recipe's own reference: what the
    artifact must match up to arithmetic, separately from what quantization costs."""
    inits = {i.name: i for i in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        bits, bs, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
        kb = k // bs
        codes = unpack(numpy_helper.to_array(inits[node.input[1]]), bits, bs)
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, kb)
        if len(node.input) > 3 and node.input[3]:
            zp = numpy_helper.to_array(inits[node.input[3]])
            if zp.dtype == np.uint8 and bits == 4:
                zp = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :kb]
            zp = zp.reshape(n, kb)
        else:
            zp = np.full((n, kb), 2 ** (bits - 1), np.uint8)
        w = Blocks(codes, scales, zp, bits).dequantize()
        # A packed projection (rewrites/pack_projections) holds several weights' rows.
        if node.doc_string.startswith(PACKED_DOC):
            members = json.loads(node.doc_string[len(PACKED_DOC):])
        else:
            members = [[node.input[1], n]]
        start = 0
        for qweight, rows in members:
            part, start = w[start:start + rows], start + rows
            prefix = qweight[: -len(".qweight")]
            if f"{prefix}.block_offsets" in inits:  # float-zero-point blocks (see _matmulnbits)
                offsets = numpy_helper.to_array(inits[f"{prefix}.block_offsets"]).T  # [N, kb]
                part = (part.reshape(rows, kb, bs) + offsets[..., None]).reshape(rows, k)
            name = prefix[: -len(".MatMul")] + ".weight" if prefix.endswith(".MatMul") else prefix + ".weight"
            out[name] = part
    return out
