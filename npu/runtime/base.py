"""The one session interface every backend offers, shaped like ``axengine.InferenceSession``.

The LLM runner and the diffusion pipeline only ever see this interface, so a bundle of
``.axmodel`` files on the NPU and the same bundle as ``.onnx`` files on the CPU run through the
same code. Shape groups are the NPU's way to hold several static shapes in one compiled model; a
backend with dynamic shapes (ONNX Runtime) accepts ``shape_group`` and ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


class BackendUnavailableError(RuntimeError):
    """A backend was asked for but cannot run on this host (library or device missing)."""


class NpuUnavailableError(BackendUnavailableError):
    """The NPU runtime is installed but no card answers (driver not loaded, card not seen)."""


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one model input or output.

    ``shape`` entries are ints, or strings/None for dynamic dimensions (ONNX symbolic dims).
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype


@runtime_checkable
class Session(Protocol):
    """A loaded model that runs feeds of numpy arrays and returns numpy arrays."""

    path: str
    backend: str
    group_count: int | None  # shape groups the compiled model declares; None for dynamic shapes

    def get_inputs(self, shape_group: int = 0) -> list[TensorInfo]: ...

    def get_outputs(self, shape_group: int = 0) -> list[TensorInfo]: ...

    def run(
        self,
        output_names: list[str] | None,
        feeds: dict[str, np.ndarray],
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        """Run once; outputs come back in the model's output order when names are ``None``."""
        ...

    def close(self) -> None:
        """Free the model and its buffers now (on the NPU: its CMM), not whenever GC gets to it."""
        ...
