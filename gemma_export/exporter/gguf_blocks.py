"""A GGUF tensor's own quantization blocks, as `Blocks`, without a second rounding.

    gguf_blocks(raw, qtype, n, k) -> Blocks | None     (Q8_0, Q5_0, Q6_K, Q4_K; None otherwise)

One decoder per llama.cpp block type, each returning codes, scales and zero points whose
`Blocks.dequantize()` equals `gguf.quants.dequantize` of the same bytes (tested on the real
270M). Which GGUF tensor holds which weight is models/gguf_names.py's table.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from gemma_export.exporter.blocks import Blocks


def gguf_blocks(raw: np.ndarray, qtype: str, n: int, k: int) -> Blocks | None:
    """The GGUF tensor's own blocks as Blocks (None for a type we do not carry).
    `raw` is the tensor's bytes (uint8), rows of K values along which blocks run."""
    decode = DECODERS.get(qtype)
    return None if decode is None else decode(raw.reshape(-1), n, k)


def _q8_0(b: np.ndarray, n: int, k: int) -> Blocks:
    """34 bytes / 32: fp16 d, int8 x; w = d * x."""
    blk = b.reshape(-1, 34)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    x = blk[:, 2:].copy().view(np.int8).astype(np.int16)
    codes = (x + 128).astype(np.uint8).reshape(n, k // 32, 32)
    return Blocks(codes, d.reshape(n, -1), np.full((n, k // 32), 128, np.uint8), 8)


def _q5_0(b: np.ndarray, n: int, k: int) -> Blocks:
    """22 bytes / 32: fp16 d, 4 bytes high bits, 16 bytes nibbles; w = d*(q-16)."""
    blk = b.reshape(-1, 22)
    d = blk[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    qh = blk[:, 2:6].copy().view(np.uint32)[:, 0]
    qs = blk[:, 6:]
    lo = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # elements 0..15 low nibbles, 16..31 high
    hi = ((qh[:, None] >> np.arange(32, dtype=np.uint32)[None]) & 1).astype(np.uint8)
    codes = (lo | (hi << 4)).astype(np.uint8).reshape(n, k // 32, 32)
    return Blocks(codes, d.reshape(n, -1), np.full((n, k // 32), 16, np.uint8), 8)


def _q6_k(b: np.ndarray, n: int, k: int) -> Blocks:
    """210 bytes / 256: ql 128, qh 64, int8 scales 16, fp16 d; w = d*sc*(q-32)."""
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


def _q4_k(b: np.ndarray, n: int, k: int) -> Blocks:
    """144 bytes / 256: fp16 d, dmin, 12 bytes 6-bit scales/mins, 128 nibbles;
    w = d*sc*q - dmin*mn per sub-block of 32."""
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


# GGUF tensor type name (gguf.GGMLQuantizationType.name) -> decoder
DECODERS: dict[str, Callable[[np.ndarray, int, int], Blocks]] = {
    "Q8_0": _q8_0,
    "Q5_0": _q5_0,
    "Q6_K": _q6_k,
    "Q4_K": _q4_k,
}
