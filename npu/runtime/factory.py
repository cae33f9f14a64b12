"""Choose a backend for a model file and open it.

``auto`` tries, in order: the card through pyaxcl's engine API (``axcl``: device-resident buffers,
the fast path), the card through PyAXEngine (``axengine``), then ONNX Runtime on the CPU, taking
the first whose library imports and whose files the bundle has, so one config runs unchanged on
the Pi and on a laptop. Whether a card answers is only known when the first model opens; when it
does not, ``auto`` moves on to the next candidate with one warning, and an explicit runtime fails
with what to check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from npu.runtime.axcl_backend import AxclSession, axcl_available
from npu.runtime.axengine_backend import AxEngineSession, axengine_available
from npu.runtime.base import BackendUnavailableError, NpuUnavailableError, Session
from npu.runtime.onnx_backend import OnnxSession

logger = logging.getLogger(__name__)

Backend = Literal["auto", "axcl", "axengine", "onnx"]
BACKENDS: tuple[str, ...] = ("auto", "axcl", "axengine", "onnx")
EXTENSIONS = {"axcl": ".axmodel", "axengine": ".axmodel", "onnx": ".onnx"}


def candidates(bundle_dir: Path, requested: str) -> list[str]:
    """The concrete backends to try for a bundle folder, best first."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown runtime {requested!r}; choose one of {', '.join(BACKENDS)}")
    has_ax = any(bundle_dir.glob("*.axmodel"))
    has_onnx = any(bundle_dir.glob("*.onnx"))
    if requested == "auto":
        found = [b for b, ok in (("axcl", has_ax and axcl_available()),
                                 ("axengine", has_ax and axengine_available()),
                                 ("onnx", has_onnx)) if ok]
        if found:
            return found
        if has_ax:
            raise BackendUnavailableError(
                f"{bundle_dir} holds .axmodel files only, and the NPU backend is not available here "
                "(pyaxcl, PyAXEngine or the AXCL runtime is missing); convert the model for the CPU "
                "with 'appliance models convert'"
            )
        raise FileNotFoundError(f"{bundle_dir} holds neither .axmodel nor .onnx files")
    needed = EXTENSIONS[requested]
    if not any(bundle_dir.glob(f"*{needed}")):
        raise FileNotFoundError(f"runtime {requested!r} needs {needed} files, and {bundle_dir} has none")
    return [requested]


def resolve_backend(bundle_dir: Path, requested: str) -> str:
    """The first concrete backend (``axcl``, ``axengine`` or ``onnx``) for a bundle folder."""
    return candidates(bundle_dir, requested)[0]


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
    if backend == "axcl":
        return AxclSession(path, device_id=device_id)
    if backend == "axengine":
        return AxEngineSession(path, device_id=device_id)
    return OnnxSession(path, threads=threads)


def open_sessions(
    bundle_dir: Path,
    stems_for: Callable[[str], list[str]],
    requested: str,
    *,
    device_id: int = 0,
    threads: int | None = None,
) -> tuple[str, list[Session]]:
    """Open every model of a bundle on one backend; the backend chosen and the sessions.

    ``stems_for(backend)`` names the files (relative to ``bundle_dir``, without extension), which
    may differ between a bundle's ``.axmodel`` and ``.onnx`` sets.
    """
    tried = candidates(bundle_dir, requested)
    for i, backend in enumerate(tried):
        try:
            return backend, _open_all(bundle_dir, stems_for(backend), backend, device_id, threads)
        except NpuUnavailableError as exc:
            if i == len(tried) - 1:
                raise
            then = "runs it on the CPU (ONNX Runtime)" if tried[i + 1] == "onnx" else f"tries {tried[i + 1]}"
            logger.warning("%s: %s; runtime %s %s instead", bundle_dir.name, exc, requested, then)
    raise AssertionError("unreachable")  # pragma: no cover


def _open_all(
    bundle_dir: Path, stems: list[str], backend: str, device_id: int, threads: int | None
) -> list[Session]:
    sessions: list[Session] = []
    try:
        for stem in stems:
            sessions.append(open_session(bundle_dir, stem, backend, device_id=device_id, threads=threads))
    except BaseException:
        for session in sessions:
            session.close()
        raise
    return sessions
