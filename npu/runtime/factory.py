"""Choose a backend for a model file and open it.

``auto`` picks the NPU where PyAXEngine imports and the bundle carries ``.axmodel`` files, and
ONNX Runtime on the CPU otherwise, so one config runs unchanged on the Pi and on a laptop.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from npu.runtime.axengine_backend import AxEngineSession, axengine_available
from npu.runtime.base import BackendUnavailableError, Session
from npu.runtime.onnx_backend import OnnxSession

logger = logging.getLogger(__name__)

Backend = Literal["auto", "axengine", "onnx"]
BACKENDS: tuple[str, ...] = ("auto", "axengine", "onnx")
EXTENSIONS = {"axengine": ".axmodel", "onnx": ".onnx"}


def resolve_backend(bundle_dir: Path, requested: str) -> str:
    """The concrete backend (``axengine`` or ``onnx``) for a bundle folder."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(BACKENDS)}")
    has_ax = any(bundle_dir.glob("*.axmodel"))
    has_onnx = any(bundle_dir.glob("*.onnx"))
    if requested == "auto":
        if has_ax and axengine_available():
            return "axengine"
        if has_onnx:
            return "onnx"
        if has_ax:
            raise BackendUnavailableError(
                f"{bundle_dir} holds .axmodel files only, and the NPU backend is not available here "
                "(PyAXEngine or the AXCL runtime is missing); convert the model for the CPU with "
                "'appliance models convert'"
            )
        raise FileNotFoundError(f"{bundle_dir} holds neither .axmodel nor .onnx files")
    needed = EXTENSIONS[requested]
    if not any(bundle_dir.glob(f"*{needed}")):
        raise FileNotFoundError(f"runtime {requested!r} needs {needed} files, and {bundle_dir} has none")
    return requested


def open_session(
    bundle_dir: Path,
    stem: str,
    backend: str,
    *,
    device_id: int = 0,
    threads: int | None = None,
) -> Session:
    """Open ``bundle_dir/stem.<ext>`` with a concrete backend from ``resolve_backend``."""
    if backend not in EXTENSIONS:
        raise ValueError(f"open_session needs a concrete backend, got {backend!r}")
    path = bundle_dir / f"{stem}{EXTENSIONS[backend]}"
    if not path.is_file():
        raise FileNotFoundError(f"model file missing from the bundle: {path}")
    if backend == "axengine":
        return AxEngineSession(path, device_id=device_id)
    return OnnxSession(path, threads=threads)
