"""The card through pyaxcl's engine API: models whose buffers the appliance owns on the device.

PyAXEngine copies every input to the card and every output back on each run, so a decode step
would ship each layer's whole KV cache over PCIe. pyaxcl (``import axcl``, AXERA's wheel, not on
PyPI, imported only when this backend is chosen) exposes the engine one level lower: the
appliance allocates device memory, binds it to each shape group's inputs and outputs, executes,
and copies only what must cross. ``npu/llm/resident_stack.py`` builds the device-resident KV cache
on it; ``AxclSession`` also offers the ordinary ``Session`` (numpy in, numpy out) for the post
model's logits and for the diffusion models.

The calls, as pyaxcl defines them (AXERA-TECH/pyaxcl ``axcl/rt/``): every function returns a
status (0 = success) or a tuple ending in one, and never raises. ``engine_load_from_file(path)``
-> ``(model_id, ret)``; ``engine_create_context(model_id)``; ``engine_get_io_info(model_id)``;
``engine_get_shape_groups_count(info)``; ``engine_get_num_inputs/outputs(info)``;
``engine_get_input/output_name_by_index(info, i)``; ``engine_get_input/output_dims(info, group,
i)`` -> ``(dims, ret)``; ``engine_get_input/output_data_type(info, i)`` (one type per index,
``axcl_rt_engine_type.py``: uint32 8, int32 7, fp16 13, bf16 14, fp32 15);
``engine_get_input/output_size_by_index(info, group, i)``; ``engine_create_io(info)``, one per
shape group as ax-llm creates them (``ax_model_runner_axcl.cpp``, ``sub_init``);
``engine_set_input/output_buffer_by_index(io, i, ptr, size)``; ``engine_execute(model_id,
context, group, io)``; ``malloc(size, policy)`` -> ``(ptr, ret)``; ``memset``; ``memcpy(dst,
src, count, kind)`` with kinds 1 host-to-device, 2 device-to-host, 3 device-to-device
(``axcl_rt_type.py``); ``free``. A thread must have the device's context current before it
copies or executes (PyAXEngine sets it before every run, ``axengine/_axclrt.py``), so every
entry point here makes sure of it for the calling thread.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import ClassVar

import ml_dtypes
import numpy as np

from npu.device.base import DeviceFault
from npu.runtime.base import BackendUnavailableError, NpuUnavailableError, TensorInfo

logger = logging.getLogger(__name__)

H2D, D2H, D2D = 1, 2, 3  # axclrtMemcpyKind
NORMAL_ONLY = 2  # AXCL_MEM_MALLOC_NORMAL_ONLY, as PyAXEngine allocates its IO buffers
DATA_TYPES = {
    4: np.dtype(np.uint8), 3: np.dtype(np.int8), 6: np.dtype(np.uint16), 5: np.dtype(np.int16),
    8: np.dtype(np.uint32), 7: np.dtype(np.int32), 13: np.dtype(np.float16),
    14: np.dtype(ml_dtypes.bfloat16), 15: np.dtype(np.float32),
}

_lock = threading.Lock()
_axcl: ModuleType | None = None


def hex_status(status: int) -> str:
    return f"{status & 0xFFFFFFFF:#010x}"


def axcl_runtime() -> ModuleType:
    """pyaxcl, initialised once per process (AXCL allows one ``axclInit`` per process)."""
    global _axcl
    with _lock:
        try:
            import axcl  # type: ignore[import-not-found]
        except (ImportError, OSError, SystemExit) as exc:
            raise BackendUnavailableError(
                f"the card backend needs pyaxcl (import axcl) and the AXCL runtime: {exc!r}; install "
                "AXERA's pyaxcl wheel and the axcl driver (scripts/setup_pi), or set the model's "
                "runtime to 'axengine' or 'onnx'"
            ) from exc
        if axcl is _axcl:
            return axcl
        status = axcl.init(None)
        if status != 0:
            raise NpuUnavailableError(
                f"axcl.init failed with status {hex_status(status)}: the AXCL runtime cannot reach a "
                "card; is its driver loaded ('axcl-smi' should list the card)?"
            )
        atexit.register(axcl.finalize)
        _axcl = axcl
        return axcl


def axcl_available() -> bool:
    try:
        axcl_runtime()
    except BackendUnavailableError:
        return False
    return True


def reset_runtime() -> None:
    """Forget the initialised module (tests install a fresh simulated card each time)."""
    global _axcl
    with _lock:
        _axcl = None


class AxclDevice:
    """One card, by index, with this process's context on it, made current per thread.

    It lives while models are open on it: when the last one closes (a reload, or a recovery that
    rebooted the card), its context is destroyed and the next model opens a fresh one, so nothing
    made before a reboot is used after it.
    """

    _devices: ClassVar[dict[tuple[int, int], AxclDevice]] = {}

    def __init__(self, axcl: ModuleType, index: int) -> None:
        ids, status = axcl.rt.get_device_list()
        if status != 0 or not ids:
            raise NpuUnavailableError(
                f"no card answers (get_device_list: status {hex_status(status)}, {len(ids)} cards): "
                "'lspci' must list the AX650N and 'axcl-smi' must show it"
            )
        if index >= len(ids):
            raise NpuUnavailableError(
                f"device.ids names card {index}, but the runtime lists {len(ids)} (device ids {ids})"
            )
        self.axcl, self.index, self.id = axcl, index, int(ids[index])
        status = axcl.rt.set_device(self.id)
        if status != 0:
            raise NpuUnavailableError(
                f"card {index} (device id {self.id}) cannot be opened: {hex_status(status)}"
            )
        self.context, status = axcl.rt.create_context(self.id)
        if status != 0:
            raise NpuUnavailableError(
                f"no context on card {index} (device id {self.id}): {hex_status(status)}"
            )
        self._local = threading.local()
        self.users = 0
        self.key = (id(axcl), index)
        logger.info("card %d is device id %d", index, self.id)

    @classmethod
    def acquire(cls, index: int) -> AxclDevice:
        """The card's device for one more open model."""
        axcl = axcl_runtime()
        with _lock:
            device = cls._devices.get((id(axcl), index))
            if device is None:
                device = cls(axcl, index)
                cls._devices[device.key] = device
            device.users += 1
            return device

    def release(self) -> None:
        """One model fewer; the last one out destroys the context."""
        with _lock:
            self.users -= 1
            if self.users > 0:
                return
            if self._devices.get(self.key) is self:
                del self._devices[self.key]
        status = self.axcl.rt.destroy_context(self.context)
        if status != 0:
            logger.warning("card %d: destroy_context failed with status %s", self.index, hex_status(status))

    def current(self) -> ModuleType:
        """``axcl`` with this card's context current on the calling thread."""
        if getattr(self._local, "set", False) is not True:
            status = self.axcl.rt.set_current_context(self.context)
            if status != 0:
                raise DeviceFault(f"card {self.index}: set_current_context failed {hex_status(status)}")
            self._local.set = True
        return self.axcl

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise DeviceFault(f"card {self.index}: {what} failed with status {hex_status(status)}")

    def malloc(self, size: int, what: str) -> DeviceBuffer:
        axcl = self.current()
        ptr, status = axcl.rt.malloc(int(size), NORMAL_ONLY)
        if status != 0 or not ptr:
            raise DeviceMemoryError(
                f"card {self.index}: no room for {size / 2**20:.1f} MiB of {what} in the card's memory "
                f"(CMM; malloc status {hex_status(status)})"
            )
        return DeviceBuffer(self, int(ptr), int(size))

    def upload(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.check(self.current().rt.memcpy(ptr, array.ctypes.data, array.nbytes, H2D), "host-to-device copy")

    def download(self, array: np.ndarray, ptr: int) -> None:
        self.check(self.current().rt.memcpy(array.ctypes.data, ptr, array.nbytes, D2H), "device-to-host copy")

    def copy(self, dst: int, src: int, count: int) -> None:
        self.check(self.current().rt.memcpy(dst, src, count, D2D), "device-to-device copy")


class DeviceMemoryError(RuntimeError):
    """The card's memory (CMM) cannot hold what was asked; the message says how much and for what."""


@dataclass
class DeviceBuffer:
    device: AxclDevice
    ptr: int
    size: int

    def zero(self) -> None:
        """Device memory comes uncleared; a cache or placeholder must hold zeros, not NaN patterns."""
        self.device.check(self.device.current().rt.memset(self.ptr, 0, self.size), "memset")

    def free(self) -> None:
        if self.ptr:
            status = self.device.current().rt.free(self.ptr)
            self.ptr = 0
            if status != 0:
                logger.warning("card %d: free failed with status %s", self.device.index, hex_status(status))


class AxclModel:
    """One compiled ``.axmodel`` loaded through the engine API, with its declared groups."""

    backend = "axcl"

    def __init__(self, path: str | Path, *, device_id: int = 0) -> None:
        self.path = str(path)
        self.device = AxclDevice.acquire(device_id)
        rt = self.device.current().rt
        self.model_id, status = rt.engine_load_from_file(self.path)
        if status != 0:
            self.device.release()
            raise RuntimeError(f"{self.path}: the engine could not load it (status {hex_status(status)})")
        self._ios: list[int] = []
        self.info = 0
        try:
            self.context, status = rt.engine_create_context(self.model_id)
            self.device.check(status, f"{self.path}: engine_create_context")
            self.info, status = rt.engine_get_io_info(self.model_id)
            self.device.check(status, f"{self.path}: engine_get_io_info")
            count, status = rt.engine_get_shape_groups_count(self.info)
            self.device.check(status, f"{self.path}: engine_get_shape_groups_count")
            self.group_count = int(count)
            self._inputs = [self._tensors(g, outputs=False) for g in range(self.group_count)]
            self._outputs = [self._tensors(g, outputs=True) for g in range(self.group_count)]
        except BaseException:
            self._release()
            self.device.release()
            raise

    def _tensors(self, group: int, *, outputs: bool) -> list[TensorInfo]:
        rt = self.device.axcl.rt
        kind = "output" if outputs else "input"
        count = getattr(rt, f"engine_get_num_{kind}s")(self.info)
        tensors = []
        for i in range(count):
            name = getattr(rt, f"engine_get_{kind}_name_by_index")(self.info, i)
            dims, status = getattr(rt, f"engine_get_{kind}_dims")(self.info, group, i)
            self.device.check(status, f"{self.path}: engine_get_{kind}_dims")
            code, status = getattr(rt, f"engine_get_{kind}_data_type")(self.info, i)
            self.device.check(status, f"{self.path}: engine_get_{kind}_data_type")
            if code not in DATA_TYPES:
                raise RuntimeError(f"{self.path}: {kind} {name} has data type {code}, unknown here")
            tensors.append(TensorInfo(str(name), tuple(int(d) for d in dims), DATA_TYPES[code]))
        return tensors

    def get_inputs(self, shape_group: int = 0) -> list[TensorInfo]:
        return list(self._inputs[shape_group])

    def get_outputs(self, shape_group: int = 0) -> list[TensorInfo]:
        return list(self._outputs[shape_group])

    def input_index(self, name: str) -> int:
        return [t.name for t in self._inputs[0]].index(name)

    def output_index(self, name: str) -> int:
        return [t.name for t in self._outputs[0]].index(name)

    def new_io(self) -> int:
        io, status = self.device.current().rt.engine_create_io(self.info)
        self.device.check(status, f"{self.path}: engine_create_io")
        self._ios.append(io)
        return int(io)

    def drop_io(self, io: int) -> None:
        if io in self._ios:
            self._ios.remove(io)
            self.device.current().rt.engine_destroy_io(io)

    def bind(self, io: int, *, inputs: dict[int, DeviceBuffer | tuple[int, int]] | None = None,
             outputs: dict[int, DeviceBuffer | tuple[int, int]] | None = None) -> None:
        rt = self.device.current().rt
        for side, buffers in (("input", inputs or {}), ("output", outputs or {})):
            setter = getattr(rt, f"engine_set_{side}_buffer_by_index")
            for index, buffer in buffers.items():
                ptr, size = (buffer.ptr, buffer.size) if isinstance(buffer, DeviceBuffer) else buffer
                self.device.check(setter(io, index, ptr, size), f"{self.path}: binding {side} {index}")

    def execute(self, group: int, io: int) -> None:
        status = self.device.current().rt.engine_execute(self.model_id, self.context, group, io)
        if status != 0:
            raise DeviceFault(f"NPU run of {Path(self.path).name} failed with status {hex_status(status)}")

    def _release(self) -> None:
        rt = self.device.axcl.rt
        for io in self._ios:
            rt.engine_destroy_io(io)
        self._ios.clear()
        if self.info:
            rt.engine_destroy_io_info(self.info)
            self.info = 0
        if self.model_id:
            rt.engine_unload(self.model_id)
            self.model_id = 0

    def close(self) -> None:
        if not self.model_id:
            return  # closed already
        try:
            self.device.current()
        except DeviceFault:
            logger.warning("card %d: closing %s without a context", self.device.index, self.path)
        self._release()
        self.device.release()


class AxclSession(AxclModel):
    """The ordinary ``Session`` on the engine API: numpy feeds in, numpy outputs back.

    One IO per shape group with its own buffers (sized for that group), allocated when the group
    first runs; each run copies the feeds up and the outputs down, as PyAXEngine does.
    """

    def __init__(self, path: str | Path, *, device_id: int = 0) -> None:
        super().__init__(path, device_id=device_id)
        self._group_io: dict[int, tuple[int, list[DeviceBuffer], list[DeviceBuffer]]] = {}

    def _io_for(self, group: int) -> tuple[int, list[DeviceBuffer], list[DeviceBuffer]]:
        made = self._group_io.get(group)
        if made is None:
            io = self.new_io()
            what = Path(self.path).name
            ins = [self.device.malloc(_nbytes(t), f"{what} input") for t in self._inputs[group]]
            outs = [self.device.malloc(_nbytes(t), f"{what} output") for t in self._outputs[group]]
            made = (io, ins, outs)
            self._group_io[group] = made
            self.bind(io, inputs=dict(enumerate(ins)), outputs=dict(enumerate(outs)))
        return made

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray],
            shape_group: int = 0) -> list[np.ndarray]:
        io, ins, outs = self._io_for(shape_group)
        for tensor, buffer in zip(self._inputs[shape_group], ins, strict=True):
            array = feeds[tensor.name]
            if tuple(array.shape) != tensor.shape or array.dtype != tensor.dtype:
                raise ValueError(
                    f"{self.path}: group {shape_group} input {tensor.name} is {tensor.shape} {tensor.dtype}, "
                    f"fed {tuple(array.shape)} {array.dtype}"
                )
            self.device.upload(buffer.ptr, array)
        self.execute(shape_group, io)
        results = []
        for tensor, buffer in zip(self._outputs[shape_group], outs, strict=True):
            if output_names is None or tensor.name in output_names:
                host = np.empty(tensor.shape, tensor.dtype)  # type: ignore[arg-type]
                self.device.download(host, buffer.ptr)
                results.append(host)
        return results

    def close(self) -> None:
        for _, ins, outs in self._group_io.values():
            for buffer in (*ins, *outs):
                buffer.free()
        self._group_io.clear()
        super().close()


def _nbytes(tensor: TensorInfo) -> int:
    return int(math.prod(int(d) for d in tensor.shape) * tensor.dtype.itemsize)  # type: ignore[arg-type]

