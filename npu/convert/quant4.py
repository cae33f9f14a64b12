"""4-bit weights for ONNX Runtime's ``com.microsoft.MatMulNBits`` (block size 32).

MatMulNBits dequantizes ``w = (q - zp) * scale`` per block of 32 along K; with a float zero point
(same type as the scales) that expresses GGUF ``Q4_1`` (``w = d * q + m``) as ``scale = d``,
``zp = -m / d``, so Q4_1 tensors keep their 4-bit codes unchanged. Other tensors are requantized
from fp32 with per-block min/max (asymmetric), which is Q4_1's own scheme.

Measured trade-off (docs/PERFORMANCE.md): ONNX Runtime 1.31 runs float zero points on a generic
path, about 20x slower per matmul than an fp32 MatMul on x86, while integer zero points take its
fast kernels (2.8x faster than fp32). Integer zero points cannot express Q4_1 blocks, though, and
requantizing costs ~9% relative error per matrix, which over 30 layers changed answers. Fidelity
wins here: 4-bit bundles are exact, small on disk and in memory, but not faster on a CPU yet.
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
    nb = k // BLOCK
    blocks = np.ascontiguousarray(raw).reshape(n, nb, Q4_1_BLOCK_BYTES)
    if row_order is not None:
        blocks = blocks[row_order]
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # Q4_1: low nibbles are elements 0..15
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
