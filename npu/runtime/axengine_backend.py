"""The real NPU through PyAXEngine (``import axengine``).

PyAXEngine is installed on the device from AXERA's wheel; it is not on PyPI. It is imported only
when this backend is chosen, so a host without it gets a clear message instead of an import crash.
The interface followed here is PyAXEngine 0.1.x: ``InferenceSession(path, providers=...,
provider_options=[{"device_id": n}])`` (a ``device_id=`` keyword or a ``(name, options)`` provider
tuple is silently ignored by it, so the device index must go in ``provider_options``),
``get_inputs(shape_group)``, ``get_outputs(shape_group)`` and ``run(None, feeds, shape_group=k)``
whose feeds must match each group's shape and dtype exactly.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from types import ModuleType

import numpy as np

from npu.device.base import DeviceFault
from npu.runtime.base import BackendUnavailableError, TensorInfo

logger = logging.getLogger(__name__)

AXCLRT_PROVIDER = "AXCLRTExecutionProvider"
AXENGINE_PROVIDER = "AxEngineExecutionProvider"
PROVIDERS = (AXCLRT_PROVIDER, AXENGINE_PROVIDER)


def import_axengine() -> ModuleType:
    """Import PyAXEngine, turning its absence into ``BackendUnavailableError``.

    ``import axengine`` raises ``ImportError("No providers found ...")`` where neither libaxcl_rt
    (PCIe card) nor libax_engine (board) is in the linker cache, and prints its provider list to
    stdout, which is captured here so the CLI's output stays clean.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            import axengine
    except ImportError as exc:
        raise BackendUnavailableError(
            "the NPU backend needs PyAXEngine (import axengine) and the AXCL runtime "
            f"(libaxcl_rt): {exc}. Install AXERA's axengine wheel and driver on the device "
            "(scripts/setup_pi), or set the model's runtime to 'onnx' to run on the CPU."
        ) from exc
    for line in captured.getvalue().splitlines():
        logger.debug("axengine: %s", line)
    return axengine


def axengine_available() -> bool:
    try:
        import_axengine()
    except BackendUnavailableError:
        return False
    return True


class AxEngineSession:
    """One compiled ``.axmodel`` on one NPU device."""

    backend = "axengine"

    def __init__(self, path: str | Path, *, device_id: int = 0, provider: str | None = None) -> None:
        axengine = import_axengine()
        if provider is not None and provider not in PROVIDERS:
            raise ValueError(f"unknown NPU provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        self.path = str(path)
        self.device_id = device_id
        with contextlib.redirect_stdout(io.StringIO()):
            self._sess = axengine.InferenceSession(
                self.path,
                providers=[provider] if provider else None,
                provider_options=[{"device_id": device_id}],
            )
        self._groups: dict[int, tuple[list[TensorInfo], list[TensorInfo]]] = {}

    @staticmethod
    def _convert(nodes) -> list[TensorInfo]:  # type: ignore[no-untyped-def]
        return [TensorInfo(str(n.name), tuple(int(d) for d in n.shape), np.dtype(n.dtype)) for n in nodes]

    def _group(self, shape_group: int) -> tuple[list[TensorInfo], list[TensorInfo]]:
        cached = self._groups.get(shape_group)
        if cached is None:
            cached = (
                self._convert(self._sess.get_inputs(shape_group)),
                self._convert(self._sess.get_outputs(shape_group)),
            )
            self._groups[shape_group] = cached
        return cached

    def get_inputs(self, shape_group: int = 0) -> list[TensorInfo]:
        return list(self._group(shape_group)[0])

    def get_outputs(self, shape_group: int = 0) -> list[TensorInfo]:
        return list(self._group(shape_group)[1])

    def run(
        self,
        output_names: list[str] | None,
        feeds: dict[str, np.ndarray],
        shape_group: int = 0,
    ) -> list[np.ndarray]:
        try:
            return self._sess.run(output_names, feeds, shape_group=shape_group)
        except AssertionError:
            raise  # a shape or dtype mismatch: a bug in the feeds, not the device
        except RuntimeError as exc:
            # "axclrtEngineExecute failed 0x...": the card is gone or wedged; the engine recovers it.
            raise DeviceFault(f"NPU run failed: {exc}") from exc

    def close(self) -> None:
        """Unload the model from the card now.

        PyAXEngine keeps every session in a module-level list until the process exits
        (``axengine/_axclrt.py``: ``_all_model_instances.append(self)`` in ``__init__``, and only
        ``_finalize_axclrt`` at exit unloads them), so dropping the last reference frees nothing
        on the card: a reload or a recovery would leak the model's CMM each time. Its own unload
        (``AXCLRTSession._unload``: free the IO buffers, then ``axclrtEngineUnload``) is
        idempotent, so it is called here, and the emptied object stays in that list: taking it out
        would make its ``__del__`` (which removes itself from the list) raise.
        """
        inner = getattr(self._sess, "_sess", None)
        self._sess = None
        unload = getattr(inner, "_unload", None)
        if unload is not None:
            unload()
