"""ONNX Runtime on the CPU: the twin of the NPU used for development, tests and demos."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from npu.runtime.base import BackendUnavailableError, TensorInfo

logger = logging.getLogger(__name__)

_ORT_TYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(double)": np.dtype(np.float64),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(uint32)": np.dtype(np.uint32),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


def _import_onnxruntime():  # type: ignore[no-untyped-def]
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a hard dependency
        raise BackendUnavailableError(f"onnxruntime is not installed: {exc}") from exc
    return onnxruntime


def default_threads() -> int:
    """Intra-op threads: the cores this process may use, at most 4 (small matmuls stop scaling)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


class OnnxSession:
    """``axengine.InferenceSession``-shaped wrapper over ``onnxruntime.InferenceSession``."""

    backend = "onnx"
    group_count = None  # one graph with dynamic dimensions serves every shape group

    def __init__(self, path: str | Path, *, threads: int | None = None, spin_us: int = 0) -> None:
        ort = _import_onnxruntime()
        self.path = str(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        # A bundle is one session per layer, each with its own pool: spinning workers of idle
        # pools would steal the cores from the one session running (10x slower decode). ``spin_us``
        # is for a session that runs alone (the twin graph, every layer in one run): its workers
        # spin that long between operators, and stop when a run ends.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if spin_us:
            opts.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
            opts.add_session_config_entry("session.force_spinning_stop", "1")
        self._sess = ort.InferenceSession(self.path, sess_options=opts, providers=["CPUExecutionProvider"])
        self._inputs = [self._info(n) for n in self._sess.get_inputs()]
        self._outputs = [self._info(n) for n in self._sess.get_outputs()]
        self._output_names = [o.name for o in self._outputs]

    @staticmethod
    def _info(node) -> TensorInfo:  # type: ignore[no-untyped-def]
        dtype = _ORT_TYPES.get(node.type)
        if dtype is None:
            raise ValueError(f"unsupported ONNX tensor type {node.type} for {node.name}")
        return TensorInfo(node.name, tuple(node.shape), dtype)

    def get_inputs(self, shape_group: int = 0) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self, shape_group: int = 0) -> list[TensorInfo]:
        return list(self._outputs)

    def run(
        self,
        output_names: list[str] | None,
        feeds: dict[str, np.ndarray],
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        return self._sess.run(output_names or self._output_names, feeds)

    def binding(self) -> OnnxBinding:
        """Inputs and outputs bound to host arrays once, run many times without feed dicts."""
        return OnnxBinding(self._sess)

    def close(self) -> None:
        self._sess = None  # type: ignore[assignment]


class OnnxBinding:
    """ONNX Runtime IO binding over numpy arrays the caller owns and updates in place.

    Each bound array is wrapped once as an ``OrtValue`` sharing its memory, so a run reads the
    inputs where they are and writes the outputs into the caller's buffers: no feed dict, no
    output allocation and no copy per call. The arrays must stay alive and C-contiguous.
    """

    def __init__(self, sess) -> None:  # type: ignore[no-untyped-def]
        self._ort = _import_onnxruntime()
        self._sess = sess
        self._io = sess.io_binding()
        self._keep: dict[str, np.ndarray] = {}

    def value(self, array: np.ndarray):  # type: ignore[no-untyped-def]
        """An ``OrtValue`` over ``array``'s memory, to bind to several sessions."""
        if not array.flags.c_contiguous:
            raise ValueError("bound arrays must be C-contiguous")
        return self._ort.OrtValue.ortvalue_from_numpy(array)

    def input(self, name: str, array: np.ndarray, value=None) -> None:  # type: ignore[no-untyped-def]
        self._keep["in:" + name] = array
        self._io.bind_ortvalue_input(name, value if value is not None else self.value(array))

    def output(self, name: str, array: np.ndarray, value=None) -> None:  # type: ignore[no-untyped-def]
        self._keep["out:" + name] = array
        self._io.bind_ortvalue_output(name, value if value is not None else self.value(array))

    def run(self) -> None:
        self._sess.run_with_iobinding(self._io)
