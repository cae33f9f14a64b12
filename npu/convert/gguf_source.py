"""Read a GGUF file into the numbers and fp32 weights the bundle writer needs.

GGUF stores tensor shapes in ggml ``ne`` order (fastest axis first); the reader's ``data`` and
``gguf.quants.dequantize`` already give numpy row-major arrays shaped ``[out, in]`` like PyTorch's
``Linear.weight``. llama.cpp permutes ``attn_q``/``attn_k`` of ``llama`` models for its interleaved
RoPE; we undo that so the graphs use Hugging Face's rotate-half RoPE.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class Hyperparams:
    """Architecture numbers of one GGUF model (the ``config.json`` core)."""

    arch: str
    num_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    context_length: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def unpermute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (interleaved -> rotate-half rows per head)."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_llama(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``permute`` as its converter applies it (used to build test GGUFs)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fast_reader_class() -> type:
    """``gguf.GGUFReader`` parsing over a plain ndarray view of its memmap.

    The reader slices its ``np.memmap`` once per metadata item (~1M slices for a 50k vocabulary);
    every memmap slice runs ``memmap.__array_finalize__``, which makes opening a GGUF take seconds.
    A plain view of the same mapping parses about 5x faster and reads the same bytes.
    """
    import gguf

    class _Reader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)

    return _Reader


class GGUFSource:
    """One open GGUF: metadata by key, tensors by name, dequantized on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with self.path.open("rb") as fh:
            magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self.reader = _fast_reader_class()(self.path, "r")
        except Exception as exc:  # corrupt or truncated file
            raise ValueError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(self.get("general.architecture", ""))
        if self.arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported GGUF architecture {self.arch!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )

    # -- metadata -----------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise ValueError(f"{self.path.name} lacks GGUF key {key!r}")
        return self.get(key)

    def hyperparams(self) -> Hyperparams:
        a = self.arch
        hidden = int(self.require(f"{a}.embedding_length"))
        n_heads = int(self.require(f"{a}.attention.head_count"))
        n_kv = int(self.get(f"{a}.attention.head_count_kv", n_heads))
        head_dim = int(self.get(f"{a}.attention.key_length", hidden // n_heads))
        embd = self._tensors["token_embd.weight"]
        vocab = int(self.get(f"{a}.vocab_size", int(embd.shape[1])))
        return Hyperparams(
            arch=a,
            num_layers=int(self.require(f"{a}.block_count")),
            hidden=hidden,
            intermediate=int(self.require(f"{a}.feed_forward_length")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            vocab_size=vocab,
            rms_eps=float(self.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self.get(f"{a}.rope.freq_base", 10000.0)),
            context_length=int(self.get(f"{a}.context_length", 2048)),
            tied="output.weight" not in self._tensors,
        )

    # -- tensors ------------------------------------------------------------------------------

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def raw(self, name: str) -> Any:
        """The reader's tensor (type, shape and raw blocks) for exact requantization."""
        try:
            return self._tensors[name]
        except KeyError:
            raise ValueError(f"{self.path.name} lacks tensor {name!r}") from None

    def tensor(self, name: str) -> np.ndarray:
        """fp32 numpy array shaped like the Hugging Face parameter (``[out, in]`` for matrices)."""
        import gguf
        from gguf.quants import dequantize

        t = self.raw(name)
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            arr = np.array(t.data, dtype=np.float32)
        else:
            arr = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        arr = arr.reshape(shape)
        if len(shape) == 2 and name.endswith(("attn_q.weight", "attn_k.weight")) and self.arch == "llama":
            hp = self.hyperparams_cached
            n = hp.n_heads if name.endswith("attn_q.weight") else hp.n_kv_heads
            arr = unpermute_llama(arr, n)
        return np.ascontiguousarray(arr)

    @property
    def hyperparams_cached(self) -> Hyperparams:
        cached = getattr(self, "_hp", None)
        if cached is None:
            cached = self._hp = self.hyperparams()
        return cached

    def is_permuted(self, name: str) -> bool:
        """Whether ``tensor(name)`` reorders rows relative to the raw GGUF blocks."""
        return self.arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight"))

    def permuted_heads(self, name: str) -> int:
        hp = self.hyperparams_cached
        return hp.n_heads if name.endswith("attn_q.weight") else hp.n_kv_heads
