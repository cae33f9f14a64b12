"""The token embedding table, kept on the host as AXERA's runtime does.

A bundle carries ``model.embed_tokens.weight.bfloat16.bin`` (raw bf16, the NPU contract) and may
carry ``model.embed_tokens.weight.npy`` (exact fp32, written by the converter for the CPU twin).
Both are memory-mapped: only the rows of tokens actually seen are paged in, which matters on a
Pi where the whole table of a 150k-token vocabulary would cost hundreds of MB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BF16_FILE = "model.embed_tokens.weight.bfloat16.bin"
FP32_FILE = "model.embed_tokens.weight.npy"


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class EmbeddingTable:
    """Row lookup returning float32 ``(n, hidden)`` arrays."""

    def __init__(self, bundle_dir: Path, vocab_size: int, hidden_size: int) -> None:
        fp32 = bundle_dir / FP32_FILE
        bf16 = bundle_dir / BF16_FILE
        if fp32.is_file():
            table = np.load(fp32, mmap_mode="r")
            self._bf16 = False
        elif bf16.is_file():
            table = np.memmap(bf16, dtype=np.uint16, mode="r")
            self._bf16 = True
        else:
            raise FileNotFoundError(f"{bundle_dir} has no embedding table ({BF16_FILE} or {FP32_FILE})")
        expected = vocab_size * hidden_size
        if table.size != expected:
            raise ValueError(
                f"embedding table in {bundle_dir} has {table.size} values; "
                f"config.json says vocab {vocab_size} x hidden {hidden_size} = {expected}"
            )
        self._table = table.reshape(vocab_size, hidden_size)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size

    def lookup(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        rows = self._table[np.asarray(token_ids, dtype=np.int64)]
        return bf16_bits_to_float32(rows) if self._bf16 else np.asarray(rows, dtype=np.float32)
