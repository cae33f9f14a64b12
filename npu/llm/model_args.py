"""Architecture numbers of an LLM bundle, read from its ``config.json``.

The same file serves bundles written by ``appliance models convert`` (CPU twin, ``.onnx``) and
bundles published by AXERA for the NPU (``.axmodel``), whose ``config.json`` is the original
Hugging Face one. Unknown keys are ignored so either source loads; numbers the Hugging Face file
lacks (``kv_cache_len``, ``prefill_chunk``) come from the compiled models' shapes when absent.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFILL_CHUNK = 128
DEFAULT_KV_CACHE_LEN = 2047
# The converter's bundle format, written into config.json and raised whenever its graphs or
# weight forms change: 2 moved 4-bit weights onto ONNX Runtime's fast kernels and the layers onto
# its fused operators; 3 added the twin graph (every layer in one model, attention on a shared
# head-major cache) and one weights file the graphs share; 4 runs the twin graph on 2-D
# activations with the Q4_1 offsets in one Gemm each. A converted bundle of an older format still
# runs, but slower; it is converted again to get the new one.
BUNDLE_FORMAT = 4


@dataclass
class ModelArgs:
    """Hyperparameters the runner needs; defaults match a small llama-style model."""

    model_type: str = "llama"
    num_hidden_layers: int = 1
    hidden_size: int = 64
    intermediate_size: int = 128
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None
    vocab_size: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    max_position_embeddings: int = 2048
    # Appliance keys (written by the converter; absent from AXERA's Hugging Face config.json).
    kv_cache_len: int | None = None
    prefill_chunk: int = PREFILL_CHUNK
    max_prefill_chunks: int | None = None
    model_prefix: str | None = None
    weight_bits: int | None = None
    bundle_format: int | None = None  # None: AXERA's own config.json, or a converter before format 2

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        elif self.eos_token_id is None:
            self.eos_token_id = []

    @property
    def kv_dim(self) -> int:
        assert self.head_dim is not None
        return self.head_dim * self.num_key_value_heads

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    @classmethod
    def load(cls, bundle_dir: str | Path) -> ModelArgs:
        path = Path(bundle_dir) / "config.json"
        with path.open(encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    @property
    def converted_before_current_format(self) -> bool:
        """A bundle our converter wrote (it has ``kv_cache_len``) in a format older than this one."""
        return self.kv_cache_len is not None and (self.bundle_format or 1) < BUNDLE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
