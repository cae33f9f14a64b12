"""The real NPU through PyAXEngine (``import axengine``).

PyAXEngine is installed on the device from AXERA's wheel; it is not on PyPI. It is imported only
when this backend is chosen, so a host without it gets a clear message instead of an import crash.
What this backend relies on, as PyAXEngine defines it (AXERA-TECH/pyaxengine, ``axengine/``):

- ``import axengine`` raises ``ImportError("No providers found ...")`` where neither libaxcl_rt
  nor libax_engine is in the linker cache (``__init__.py``), and prints its provider list.
- ``InferenceSession(path, sess_options, providers, provider_options)`` takes the card *index*
  in ``provider_options=[{"device_id": n}]`` only (``_session.py`` passes ``provider_options`` on,
  not a provider tuple's options; ``_axclrt.py`` indexes ``axclrtGetDeviceList`` with it). Without
  a card it raises ``RuntimeError``: ``Failed to initialize axcl runtime`` (on the first import of
  ``_axclrt``), ``Get AXCL device failed ...``, ``Device index N is out of range ...`` or
  ``Set AXCL device failed ...``. Those become ``NpuUnavailableError`` saying what to check.
- ``get_inputs(g)``/``get_outputs(g)`` raise ``ValueError`` only for ``g > count``, and
  ``IndexError`` for ``g == count`` (``_base_session.py``), which is how the groups are counted.
- ``run(None, feeds, shape_group=g)`` asserts that each feed has its group's declared shape and
  dtype (``_axclrt.py``, the assert before the host-to-device copy). ``output_names`` must be
  ``None`` or list every output: ``run`` calls ``output_names.index`` for each declared output, so
  a subset raises ``ValueError``; ``None`` is always passed. A failed execution raises
  ``RuntimeError("axclrtEngineExecute failed 0x...")``, which becomes ``DeviceFault``.
- It prints ``[INFO]`` lines while it imports and while a session loads; they are captured for
  the loading thread only (see ``ThreadStdout``), so another thread's output is never swallowed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import numpy as np

from npu.device.base import DeviceFault
from npu.runtime.base import BackendUnavailableError, NpuUnavailableError, TensorInfo

logger = logging.getLogger(__name__)

AXCLRT_PROVIDER = "AXCLRTExecutionProvider"
AXENGINE_PROVIDER = "AxEngineExecutionProvider"
PROVIDERS = (AXCLRT_PROVIDER, AXENGINE_PROVIDER)
MAX_GROUPS = 256  # a bound on counting shape groups; AXERA's models hold a few dozen at most

# PyAXEngine's constructor messages that mean "no card answers", and what to check for each.
_NO_CARD_HINTS = (
    ("Failed to initialize axcl runtime",
     "the AXCL runtime did not start (axclInit failed): is the card's driver loaded? "
     "'lsmod | grep axcl' and 'axcl-smi' should show it; 'sudo scripts/setup_pi --check' explains"),
    ("Get AXCL device failed",
     "no card answers (axclrtGetDeviceList found none): 'lspci' must list the AX650N (on a Pi 5 "
     "'dtparam=pciex1' in /boot/firmware/config.txt) and 'axcl-smi' must show it"),
    ("out of range",
     "device.ids names a card that is not there: 'axcl-smi' lists the cards, numbered from 0"),
    ("Set AXCL device failed",
     "the card is seen but cannot be opened (another process may hold it, or it needs "
     "'axcl-smi reboot -d N')"),
    ("axclrtEngineInit",
     "the card's NPU engine did not initialise; 'axcl-smi reboot -d N' or a host reboot helps"),
)


class ThreadStdout(io.TextIOBase):
    """``sys.stdout`` that keeps the prints of marked threads and passes every other write on.

    ``contextlib.redirect_stdout`` swaps the stream for the whole process, so a reload during a
    recovery would swallow what any other thread prints meanwhile. This stream is installed once
    and diverts only the threads inside ``capture_prints``.
    """

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target
        self.captured = threading.local()

    def write(self, text: str) -> int:
        buffer: list[str] | None = getattr(self.captured, "lines", None)
        if buffer is None:
            return self.target.write(text)
        buffer.append(text)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding... of the real stream
        return getattr(self.target, name)


_stdout_lock = threading.Lock()


@contextlib.contextmanager
def capture_prints() -> Iterator[list[str]]:
    """What this thread prints inside the block, kept from stdout and returned as lines."""
    with _stdout_lock:
        stream = sys.stdout
        if not isinstance(stream, ThreadStdout):
            stream = ThreadStdout(sys.stdout)
            sys.stdout = stream
    lines: list[str] = []
    stream.captured.lines = lines
    try:
        yield lines
    finally:
        stream.captured.lines = None
        for line in "".join(lines).splitlines():
            if line.strip():
                logger.debug("axengine: %s", line.strip())


def import_axengine() -> ModuleType:
    """Import PyAXEngine, turning its absence into ``BackendUnavailableError``."""
    try:
        with capture_prints():
            import axengine
    except ImportError as exc:
        raise BackendUnavailableError(
            "the NPU backend needs PyAXEngine (import axengine) and the AXCL runtime "
            f"(libaxcl_rt): {exc}. Install AXERA's axengine wheel and driver on the device "
            "(scripts/setup_pi), or set the model's runtime to 'onnx' to run on the CPU."
        ) from exc
    return axengine


def axengine_available() -> bool:
    try:
        import_axengine()
    except BackendUnavailableError:
        return False
    return True


def no_card_error(path: str, device_id: int, exc: RuntimeError) -> NpuUnavailableError | None:
    """``NpuUnavailableError`` with what to check, when PyAXEngine's error means no card answers."""
    said = str(exc)
    for marker, hint in _NO_CARD_HINTS:
        if marker in said:
            return NpuUnavailableError(f"NPU card {device_id} is not usable ({said}): {hint}")
    return None


class AxEngineSession:
    """One compiled ``.axmodel`` on one NPU card (``device_id`` is the card's index)."""

    backend = "axengine"

    def __init__(self, path: str | Path, *, device_id: int = 0, provider: str | None = None) -> None:
        axengine = import_axengine()
        if provider is not None and provider not in PROVIDERS:
            raise ValueError(f"unknown NPU provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
        self.path = str(path)
        self.device_id = device_id
        try:
            with capture_prints():
                self._sess = axengine.InferenceSession(
                    self.path,
                    providers=[provider] if provider else None,
                    provider_options=[{"device_id": device_id}],
                )
        except RuntimeError as exc:
            raise no_card_error(self.path, device_id, exc) or RuntimeError(
                f"{self.path}: PyAXEngine could not load it on card {device_id}: {exc}"
            ) from exc
        self._groups: dict[int, tuple[list[TensorInfo], list[TensorInfo]]] = {}
        self.group_count = self._count_groups()

    def _count_groups(self) -> int:
        for group in range(MAX_GROUPS):
            try:
                self._sess.get_inputs(group)
            except (IndexError, ValueError):  # == count: IndexError; > count: ValueError
                return group
        return MAX_GROUPS

    @staticmethod
    def _convert(nodes) -> list[TensorInfo]:  # type: ignore[no-untyped-def]
        return [TensorInfo(str(n.name), tuple(int(d) for d in n.shape), np.dtype(n.dtype)) for n in nodes]

    def _group(self, shape_group: int) -> tuple[list[TensorInfo], list[TensorInfo]]:
        cached = self._groups.get(shape_group)
        if cached is None:
            if not 0 <= shape_group < self.group_count:
                raise ValueError(f"{self.path} has {self.group_count} shape groups, not {shape_group + 1}")
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
        if self._sess is None:
            raise RuntimeError(f"{self.path} was closed")
        try:
            # None: PyAXEngine needs every output named or none (a subset raises ValueError);
            # the names asked for are picked from the full list here instead.
            outs: list[np.ndarray] = self._sess.run(None, feeds, shape_group=shape_group)
        except AssertionError:
            raise  # a shape or dtype mismatch: a bug in the feeds, not the device
        except RuntimeError as exc:
            # "axclrtEngineExecute failed 0x...": the card is gone or wedged; the engine recovers it.
            raise DeviceFault(f"NPU run failed: {exc}") from exc
        if output_names is None:
            return outs
        names = [t.name for t in self.get_outputs(shape_group)]
        return [outs[names.index(name)] for name in output_names]

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
