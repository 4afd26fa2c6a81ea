"""Block quantization math, pure numpy: round to nearest, GPTQ, and the byte layouts
ONNX Runtime's MatMulNBits / GatherBlockQuantized read.

    quantize_blocks(w, bits, block_size, symmetric)      -> Blocks  (round to nearest)
    gptq_blocks(w, h, bits, block_size, symmetric)       -> Blocks  (GPTQ, given sum x x^T)
    pack / pack_zero_points / unpack                      codes <-> bytes

A weight W [N, K] is quantized in blocks along K; `Blocks` holds codes, scales and zero
points with W = scales * (codes - zero_points). Nothing here knows about graphs
(exporter/quantize.py) or files (exporter/gguf_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gemma_export.errors import ExportError


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

    def split(self, bs: int) -> Blocks:
        """The same weights in blocks of `bs` (a divisor of the block size): codes as they are
        (the packed bytes do not change), each scale and zero point repeated."""
        n, kb, old = self.codes.shape
        if bs >= old:
            return self
        assert old % bs == 0, (old, bs)
        f = old // bs
        return Blocks(self.codes.reshape(n, kb * f, bs), np.repeat(self.scales, f, axis=1),
                      np.repeat(self.zero_points, f, axis=1), self.bits)

    @property
    def default_zero_point(self) -> bool:
        """MatMulNBits' implicit zero point (2**(bits-1)) everywhere: the input can be omitted."""
        zp = self.zero_points
        return zp.dtype == np.uint8 and bool(np.all(zp == 2 ** (self.bits - 1)))


ROWS_AT_ONCE = 1 << 22  # elements of W rounded per pass: the temporaries stay ~16 MB each


def quantize_blocks(w: np.ndarray, bits: int, block_size: int, symmetric: bool = True) -> Blocks:
    """Round-to-nearest block quantization of w [N, K] along K. Rows are independent, so
    they are rounded a slab at a time: a 262144 x 640 embedding would otherwise hold
    several fp32 temporaries of its own size at once (peak RSS: docs/design.md)."""
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


def unpack(packed: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Inverse of `pack`: [N, kb, blob] bytes -> [N, kb, bs] codes."""
    if bits == 8:
        return packed
    out = np.empty(packed.shape[:-1] + (block_size,), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out
