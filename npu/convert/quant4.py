"""Quantized weights for ONNX Runtime's ``com.microsoft.MatMulNBits`` (block size 32).

MatMulNBits dequantizes ``w = (q - zp) * scale`` per block of 32 along K. Its fast kernels
(``accuracy_level`` 4: int8 activations per block, as llama.cpp's dot products) need integer
zero points; float zero points, the only form that holds GGUF ``Q4_1`` (``w = d * q + m``) in
one op, run on a generic path about 20x slower than an fp32 MatMul (docs/PERFORMANCE.md).

So the default forms keep the GGUF's codes and reach the fast kernels anyway:

- ``Q4_1`` -> ``OffsetQuantWeight``: codes unchanged, ``scale = d``, integer ``z = round(-m/d)``,
  and the remainder ``e = m + d*z`` of each block added by a small fp32 matmul over the input's
  block sums. Exact; requantizing the same weights to integer zero points instead (7% relative
  error per matrix) changed the demo model's answers within a few tokens.
- ``Q8_0`` (the tied LM head) -> ``Int8Weight``: 8-bit codes ``q + 128``, default zero point.
- anything else -> ``IntQuantWeight``, requantized with a fitted per-block scale and zero point.

``QuantWeight`` (float zero points) stays as the exact single-op form on request.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32
Q4_1_BLOCK_BYTES = 20  # fp16 d, fp16 m, 16 bytes of nibbles


@dataclass(frozen=True)
class QuantWeight:
    """``B``/``scales``/``zero_points`` inputs of MatMulNBits for a ``[n, k]`` weight."""

    packed: np.ndarray  # uint8 [n, k_blocks, BLOCK // 2]
    scales: np.ndarray  # float32 [n * k_blocks]
    zero_points: np.ndarray  # float32 [n * k_blocks]
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def dequantize(self) -> np.ndarray:
        """fp32 ``[n, k]`` as MatMulNBits sees it (for tests and checks)."""
        q = unpack(self.packed)
        nb = self.packed.shape[1]
        s = self.scales.reshape(self.n, nb, 1)
        z = self.zero_points.reshape(self.n, nb, 1)
        return ((q.reshape(self.n, nb, BLOCK) - z) * s).reshape(self.n, -1)[:, : self.k]


def pack(q: np.ndarray) -> np.ndarray:
    """uint8 codes ``[n, nb, 32]`` -> bytes ``[n, nb, 16]``, element 2i in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def from_q4_1(raw: np.ndarray, n: int, k: int, row_order: np.ndarray | None = None) -> QuantWeight:
    """Map GGUF Q4_1 blocks (``raw`` uint8 ``[n, k/32 * 20]``) onto MatMulNBits exactly.

    ``row_order`` reorders output rows (the llama q/k un-permutation acts on rows only).
    """
    d, m, q = _q4_1_blocks(raw, n, k, row_order)
    zero_d = d == 0
    scale = np.where(zero_d, 1.0, d).astype(np.float32)
    zp = np.where(zero_d, -m, -m / np.where(zero_d, 1.0, d)).astype(np.float32)
    q = np.where(zero_d[..., None], 0, q).astype(np.uint8)  # constant block: w = (0 - (-m)) * 1
    return QuantWeight(pack(q), scale.reshape(-1), zp.reshape(-1), n, k)


def quantize(w: np.ndarray) -> QuantWeight:
    """Asymmetric per-block min/max 4-bit quantization of fp32 ``[n, k]``."""
    n, k = w.shape
    nb = -(-k // BLOCK)
    padded = np.zeros((n, nb * BLOCK), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, BLOCK)
    lo = blocks.min(axis=-1)
    hi = blocks.max(axis=-1)
    flat = hi <= lo
    scale = np.where(flat, 1.0, (hi - lo) / 15.0).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    zp = (-lo / scale).astype(np.float32)
    return QuantWeight(pack(q), scale.reshape(-1), zp.reshape(-1), n, k)


@dataclass(frozen=True)
class IntQuantWeight:
    """MatMulNBits inputs with 4-bit integer zero points (its fast kernels) for a ``[n, k]`` weight."""

    packed: np.ndarray  # uint8 [n, k_blocks, BLOCK // 2]
    scales: np.ndarray  # float32 [n * k_blocks]
    zero_points: np.ndarray  # uint8 [n * ceil(k_blocks / 2)], two blocks per byte, low nibble first
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def zero_point_codes(self) -> np.ndarray:
        nb = self.packed.shape[1]
        return unpack(self.zero_points.reshape(self.n, -1))[:, :nb]

    def dequantize(self) -> np.ndarray:
        q = unpack(self.packed).astype(np.float32)
        nb = self.packed.shape[1]
        s = self.scales.reshape(self.n, nb, 1)
        z = self.zero_point_codes().reshape(self.n, nb, 1).astype(np.float32)
        return ((q.reshape(self.n, nb, BLOCK) - z) * s).reshape(self.n, -1)[:, : self.k]


# Scale candidates as fractions of a block's range over 15 steps (llama.cpp's make_qkx searches
# the same neighbourhood): a slightly smaller step often fits the bulk better than min/max.
_STEPS = np.array([15.0, 14.5, 15.5, 14.0, 16.0, 13.5], dtype=np.float32)
_ROWS_PER_PASS = 256


def quantize_int(w: np.ndarray) -> IntQuantWeight:
    """4-bit codes with per-block scale and integer zero point minimizing squared error.

    For each block of 32, several scales around ``range / 15`` are tried; each gets the zero
    point that places the block's minimum on the grid, codes by rounding, then the least-squares
    scale for those codes. The candidate with the least squared error wins.
    """
    n, k = w.shape
    nb = -(-k // BLOCK)
    codes = np.empty((n, nb, BLOCK), dtype=np.uint8)
    scales = np.empty((n, nb), dtype=np.float32)
    zps = np.empty((n, nb), dtype=np.uint8)
    for r0 in range(0, n, _ROWS_PER_PASS):
        rows = np.asarray(w[r0 : r0 + _ROWS_PER_PASS], dtype=np.float32)
        padded = np.zeros((rows.shape[0], nb * BLOCK), dtype=np.float32)
        padded[:, :k] = rows
        c, s, z = _fit_blocks(padded.reshape(rows.shape[0], nb, BLOCK))
        end = r0 + rows.shape[0]
        codes[r0:end], scales[r0:end], zps[r0:end] = c, s, z
    zp_pad = np.zeros((n, nb + nb % 2), dtype=np.uint8)
    zp_pad[:, :nb] = zps
    return IntQuantWeight(pack(codes), scales.reshape(-1), pack(zp_pad).reshape(-1), n, k)


def _fit_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = np.minimum(blocks.min(axis=-1), 0.0)  # the grid holds 0 exactly (zero point in 0..15)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    span = np.where(hi > lo, hi - lo, 1.0)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    best_q = np.zeros(blocks.shape, dtype=np.uint8)
    best_s = np.ones(lo.shape, dtype=np.float32)
    best_z = np.zeros(lo.shape, dtype=np.uint8)
    for steps in _STEPS:
        s = span / steps
        z = np.clip(np.rint(-lo / s), 0, 15)
        q = np.clip(np.rint(blocks / s[..., None]) + z[..., None], 0, 15)
        centred = q - z[..., None]
        denom = (centred * centred).sum(axis=-1)
        fitted = np.where(denom > 0, (blocks * centred).sum(axis=-1) / np.where(denom > 0, denom, 1), s)
        fitted = np.where(fitted > 0, fitted, s)
        err = ((centred * fitted[..., None] - blocks) ** 2).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, fitted, best_s).astype(np.float32)
        best_z = np.where(better, z, best_z).astype(np.uint8)
        best_q = np.where(better[..., None], q, best_q).astype(np.uint8)
    return best_q, best_s, best_z


@dataclass(frozen=True)
class OffsetQuantWeight:
    """GGUF Q4_1 exactly, on the integer-zero-point kernels: ``w = d * (q - z) + e`` per block.

    ``base`` holds the codes with ``scale = d`` and ``z = round(-m / d)``; the remainder
    ``e = m + d * z`` of each block is added as ``block_sums(x) @ offsets.T``, a matmul with
    1/32 of the work. Together they equal Q4_1's ``d * q + m`` up to float rounding.
    """

    base: IntQuantWeight
    offsets: np.ndarray  # float32 [n, k_blocks]

    @property
    def n(self) -> int:
        return self.base.n

    @property
    def k(self) -> int:
        return self.base.k

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.offsets.nbytes

    def dequantize(self) -> np.ndarray:
        return self.base.dequantize() + np.repeat(self.offsets, BLOCK, axis=1)[:, : self.k]


def _q4_1_blocks(raw: np.ndarray, n: int, k: int, row_order: np.ndarray | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``d``, ``m`` ``[n, nb]`` and codes ``[n, nb, 32]`` of GGUF Q4_1 rows."""
    nb = k // BLOCK
    blocks = np.ascontiguousarray(raw).reshape(n, nb, Q4_1_BLOCK_BYTES)
    if row_order is not None:
        blocks = blocks[row_order]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    return d, m, np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # low nibbles are elements 0..15


def from_q4_1_offsets(
    raw: np.ndarray, n: int, k: int, row_order: np.ndarray | None = None
) -> OffsetQuantWeight:
    """GGUF Q4_1 blocks as integer-zero-point codes plus per-block offsets (exact)."""
    d, m, q = _q4_1_blocks(raw, n, k, row_order)
    nb = k // BLOCK
    safe_d = np.where(d == 0, 1.0, d).astype(np.float32)
    z = np.clip(np.rint(-m / safe_d), 0, 15).astype(np.uint8)
    z = np.where(d == 0, 0, z).astype(np.uint8)
    offsets = (m + d * z).astype(np.float32)
    zp_pad = np.zeros((n, nb + nb % 2), dtype=np.uint8)
    zp_pad[:, :nb] = z
    base = IntQuantWeight(pack(q.astype(np.uint8)), d.reshape(-1), pack(zp_pad).reshape(-1), n, k)
    return OffsetQuantWeight(base, offsets)


Q8_0_BLOCK_BYTES = 34  # fp16 d, 32 int8 codes


@dataclass(frozen=True)
class Int8Weight:
    """GGUF Q8_0 exactly on MatMulNBits with 8 bits: codes ``q + 128``, the default zero point 128."""

    packed: np.ndarray  # uint8 [n, k_blocks, BLOCK]
    scales: np.ndarray  # float32 [n * k_blocks]
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes

    def dequantize(self) -> np.ndarray:
        nb = self.packed.shape[1]
        q = self.packed.astype(np.float32) - 128.0
        return (q * self.scales.reshape(self.n, nb, 1)).reshape(self.n, -1)[:, : self.k]


def from_q8_0(raw: np.ndarray, n: int, k: int) -> Int8Weight:
    nb = k // BLOCK
    blocks = np.ascontiguousarray(raw).reshape(n, nb, Q8_0_BLOCK_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return Int8Weight(q, d.reshape(-1), n, k)
