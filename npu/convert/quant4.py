"""4-bit weights for ONNX Runtime's ``com.microsoft.MatMulNBits`` (block size 32).

Asymmetric per-block quantization with *integer* zero points, packed two per byte: that is the
form ORT's fast kernels take. A float zero point could express GGUF ``Q4_1`` blocks exactly, but
ORT then falls back to a generic path about 20x slower than an fp32 matmul, which defeats the
point of 4-bit weights on a memory-bound CPU. So every tensor is requantized from the exact fp32
weights; ``ACCURACY_LEVEL`` 4 lets ORT compute with int8 activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32
ACCURACY_LEVEL = 4


@dataclass(frozen=True)
class QuantWeight:
    """``B``/``scales``/``zero_points`` inputs of MatMulNBits for a ``[n, k]`` weight."""

    packed: np.ndarray  # uint8 [n, k_blocks, BLOCK // 2]
    scales: np.ndarray  # float32 [n * k_blocks]
    zero_points: np.ndarray  # uint8 [n * ceil(k_blocks / 2)], two 4-bit zero points per byte
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def dequantize(self) -> np.ndarray:
        """fp32 ``[n, k]`` as MatMulNBits sees it (for tests and checks)."""
        nb = self.packed.shape[1]
        q = unpack(self.packed).reshape(self.n, nb, BLOCK).astype(np.float32)
        z = unpack(self.zero_points.reshape(self.n, -1))[:, :nb].reshape(self.n, nb, 1)
        s = self.scales.reshape(self.n, nb, 1)
        return ((q - z) * s).reshape(self.n, -1)[:, : self.k]


def pack(q: np.ndarray) -> np.ndarray:
    """uint8 codes ``[..., 2m]`` -> bytes ``[..., m]``, element 2i in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack(packed: np.ndarray) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def quantize(w: np.ndarray) -> QuantWeight:
    """Asymmetric per-block 4-bit quantization of fp32 ``[n, k]`` with integer zero points."""
    n, k = w.shape
    nb = -(-k // BLOCK)
    padded = np.zeros((n, nb * BLOCK), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, nb, BLOCK)
    lo = np.minimum(blocks.min(axis=-1), 0.0)  # the range holds 0, so zero is exact
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(blocks / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    zp_even = np.zeros((n, nb + nb % 2), dtype=np.uint8)
    zp_even[:, :nb] = zp
    return QuantWeight(pack(q), scale.reshape(-1), pack(zp_even).reshape(-1), n, k)
