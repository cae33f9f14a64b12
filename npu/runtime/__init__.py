"""Session backends: one ``axengine.InferenceSession``-shaped interface, NPU or CPU underneath."""

from npu.runtime.base import BackendUnavailableError, NpuUnavailableError, Session, TensorInfo
from npu.runtime.factory import BACKENDS, open_session, resolve_backend

__all__ = [
    "BACKENDS", "BackendUnavailableError", "NpuUnavailableError", "Session", "TensorInfo", "open_session",
    "resolve_backend",
]
