"""The simulated card's pyaxcl face: device memory, the engine API and a bus that counts.

Written from AXERA-TECH/pyaxcl at commit ade8079 (``axcl/rt/``), and from how ax-llm's card
build drives it (``src/runner/ax_model_runner/ax_model_runner_axcl.cpp``), rule by rule:

Status codes (``axcl_rt_memory.py``, ``axcl_rt_engine.py``: every wrapper returns ``ret``, or a
tuple ending in it, from ``finally``; it never raises)
- Every function returns 0 on success and a nonzero status otherwise; a wrong argument (an
  address outside any allocation, a buffer smaller than the group declares) is a status here,
  never an exception.

Runtime and contexts (``axcl/axcl.py:26-56``; ``axcl_rt_device.py:26-63, 167-200``;
``axcl_rt_context.py``)
- ``axcl.init(None)`` first; ``rt.get_device_list()`` gives ``(ids, ret)`` with PCIe bus numbers;
  ``rt.set_device(id)``; ``rt.create_context(id)`` gives ``(context, ret)``;
  ``rt.set_current_context(context)`` binds it to the calling thread. Memory copies and
  executions from a thread without a current context fail: PyAXEngine sets its context before
  every run for this reason (``axengine/_axclrt.py:340-342``).

Memory (``axcl_rt_memory.py``)
- ``malloc(size, policy)`` gives ``(dev_ptr, ret)`` (line 26-59); the memory is not cleared
  (axclrtMalloc makes no such promise; ax-llm clears every buffer it allocates with
  ``axcl_Memset``), so it is filled with NaN bytes here; ``memset(dev_ptr, value, count)``
  (line 259); ``free(dev_ptr)`` (line 98). Allocation beyond the card's CMM fails.
- ``memcpy(dst, src, count, kind)`` (line 293-326) with ``AXCL_MEMCPY_HOST_TO_DEVICE`` (1),
  ``DEVICE_TO_HOST`` (2), ``DEVICE_TO_DEVICE`` (3) (``axcl_rt_type.py:84-102``); host addresses
  are plain pointers (numpy's ``ctypes.data``); device addresses may point inside an allocation.

Engine (``axcl_rt_engine.py``)
- ``engine_load_from_file(path)`` -> ``(model_id, ret)`` (line 116); ``engine_create_context(
  model_id)`` -> ``(context, ret)`` (line 1496); ``engine_get_io_info(model_id)`` ->
  ``(io_info, ret)`` (line 521); ``engine_get_shape_groups_count(io_info)`` -> ``(count, ret)``
  (line 584); ``engine_get_num_inputs/outputs(io_info)`` -> int (line 618, 648);
  ``engine_get_input/output_name_by_index(io_info, i)`` -> str (line 742, 775);
  ``engine_get_input/output_dims(io_info, group, i)`` -> ``(dims, ret)`` (line 872, 915);
  ``engine_get_input/output_data_type(io_info, i)`` -> ``(type, ret)``, one type per index for
  every group (line 958, 994; ``axcl_rt_engine_type.py:54-70``: uint32 8, bf16 14, fp32 15);
  ``engine_get_input/output_size_by_index(io_info, group, i)`` -> bytes (line 678, 710).
- ``engine_create_io(io_info)`` -> ``(io, ret)`` (line 1102), one per shape group as ax-llm does
  (``sub_init``: ``axcl_EngineCreateIO`` for each group); ``engine_set_input/output_buffer_by_index(
  io, i, dev_ptr, size)`` (line 1168, 1204): a buffer may be larger than the group needs (ax-llm
  binds one K/V cache to every group), never smaller (``set_input``: "size < nSize" is refused).
- ``engine_execute(model_id, context, group, io)`` (line 1529) reads each input from the start
  of its bound buffer in the group's declared shape and dtype, and writes each output the same
  way. A hung card blocks; a dead one returns an error.
- ``engine_destroy_io``, ``engine_destroy_io_info``, ``engine_unload`` and ``rt.destroy_context``
  (``axcl_rt_context.py``) release what was made; a context made before a card's reboot must not
  be used after it, so the leak report counts contexts too.

The bus (``Bus``) counts every byte and call that crosses it, by direction: host-to-device,
device-to-host, device-to-device (a command crossing, its bytes staying on the card), and engine
executions. Calls that only touch host-side structures (IO binding, queries) are counted apart.
``leaks()`` lists what was allocated and never released.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import math
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fake_axengine import BF16, Card, Record, SimModel

FAIL = ctypes.c_int32(0x80300101).value
NO_CONNECTION = ctypes.c_int32(0x80300181).value
H2H, H2D, D2H, D2D = 0, 1, 2, 3
DATA_TYPES = {np.dtype(np.uint32): 8, np.dtype(np.int32): 7, np.dtype(np.uint8): 4, BF16: 14,
              np.dtype(np.float32): 15, np.dtype(np.float16): 13}
DEVICE_BASE = 1 << 56  # never a host address on Linux


@dataclass
class SimCard(Card):
    """A card with CMM to allocate from (7040 MiB, as ``axcl-smi`` shows an LLM8850)."""

    cmm_total: int = 7040 * 2**20


@dataclass
class IO:
    info: int
    inputs: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (ptr, size)
    outputs: dict[int, tuple[int, int]] = field(default_factory=dict)


class Memory:
    """Device allocations as host byte arrays at simulated addresses."""

    def __init__(self, card: SimCard) -> None:
        self.card = card
        self.blocks: dict[int, np.ndarray] = {}
        self._starts: list[int] = []
        self._next = DEVICE_BASE

    def alloc(self, size: int) -> int:
        if size <= 0 or self.card.cmm_used + size > self.card.cmm_total:
            return 0
        ptr = self._next
        self._next += (size + 0xFFF) // 0x1000 * 0x1000 + 0x1000
        self.blocks[ptr] = np.full(size, 0xFF, np.uint8)  # uncleared: NaN in bf16 and fp32
        bisect.insort(self._starts, ptr)
        self.card.cmm_used += size
        return ptr

    def free(self, ptr: int) -> bool:
        block = self.blocks.pop(ptr, None)
        if block is None:
            return False
        self._starts.remove(ptr)
        self.card.cmm_used -= block.size
        return True

    def view(self, ptr: int, count: int) -> np.ndarray | None:
        """The ``count`` bytes at a device address, or None when they are not all allocated."""
        i = bisect.bisect_right(self._starts, ptr) - 1
        if i < 0:
            return None
        start = self._starts[i]
        block = self.blocks[start]
        offset = ptr - start
        if offset + count > block.size or count < 0:
            return None
        return block[offset : offset + count]


def make_axcl(card: SimCard | None = None, record: Record | None = None) -> types.ModuleType:
    """An ``axcl`` module object with the runtime, memory and engine functions of ``axcl.rt``."""
    card = card if card is not None else SimCard()
    bus = record if record is not None else Record()
    mem = Memory(card)
    models: dict[int, SimModel] = {}
    infos: dict[int, int] = {}  # io_info -> model id
    ios: dict[int, IO] = {}
    contexts: set[int] = set()
    device_contexts: set[int] = set()  # made by rt.create_context, for the leak report
    ids = itertools.count(0x1000)
    local = threading.local()
    state = {"init": False}

    def host(name: str) -> None:
        bus.calls[f"host:{name}"] = bus.calls.get(f"host:{name}", 0) + 1

    def ready() -> bool:
        return state["init"] and getattr(local, "context", None) in contexts and card.driver_loaded

    # runtime ------------------------------------------------------------------------------------
    def init(config: str | None) -> int:
        if not card.driver_loaded:
            return NO_CONNECTION
        state["init"] = True
        return 0

    def finalize() -> int:
        state["init"] = False
        return 0

    rt = types.ModuleType("axcl.rt")

    def get_device_list() -> tuple[list[int], int]:
        if not state["init"]:
            return [], NO_CONNECTION
        return list(card.ids), 0

    def set_device(device_id: int) -> int:
        return 0 if state["init"] and device_id in card.ids else NO_CONNECTION

    def create_context(device_id: int) -> tuple[int, int]:
        if not state["init"] or device_id not in card.ids:
            return 0, NO_CONNECTION
        ctx = next(ids)
        contexts.add(ctx)
        device_contexts.add(ctx)
        return ctx, 0

    def destroy_context(context: int) -> int:
        if context not in device_contexts:
            return FAIL
        contexts.discard(context)
        device_contexts.discard(context)
        return 0

    def set_current_context(context: int) -> int:
        if context not in contexts:
            return FAIL
        local.context = context
        host("set_current_context")
        return 0

    # memory -------------------------------------------------------------------------------------
    def malloc(size: int, policy: int) -> tuple[int, int]:
        if not ready():
            return 0, FAIL
        ptr = mem.alloc(int(size))
        bus.count("malloc")
        return (ptr, 0) if ptr else (0, FAIL)

    def free(dev_ptr: int) -> int:
        bus.count("free")
        return 0 if mem.free(dev_ptr) else FAIL

    def memset(dev_ptr: int, value: int, count: int) -> int:
        view = mem.view(dev_ptr, count)
        if view is None or not ready():
            return FAIL
        view[:] = value
        bus.count("memset")
        return 0

    def memcpy(dst: int, src: int, count: int, kind: int) -> int:
        if not ready() or card.fault == "dead":
            return NO_CONNECTION if card.fault == "dead" else FAIL
        if kind == H2D:
            view = mem.view(dst, count)
            if view is None:
                return FAIL
            ctypes.memmove(view.ctypes.data, src, count)
            bus.count("h2d", count)
        elif kind == D2H:
            view = mem.view(src, count)
            if view is None:
                return FAIL
            ctypes.memmove(dst, view.ctypes.data, count)
            bus.count("d2h", count)
        elif kind == D2D:
            into, out_of = mem.view(dst, count), mem.view(src, count)
            if into is None or out_of is None:
                return FAIL
            into[:] = out_of.copy()
            bus.count("d2d", count)
        elif kind == H2H:
            ctypes.memmove(dst, src, count)
        else:
            return FAIL
        return 0

    # engine -------------------------------------------------------------------------------------
    def engine_init(npu_kind: int) -> int:
        return 0 if state["init"] else FAIL

    def engine_finalize() -> int:
        return 0

    def engine_load_from_file(model_path: str) -> tuple[int, int]:
        if not ready():
            return 0, FAIL
        path = Path(model_path)
        try:
            model = SimModel(path)
        except Exception:  # not a model: a status, as upstream's wrapper gives
            return 0, FAIL
        if card.cmm_used + model.nbytes > card.cmm_total:
            return 0, FAIL
        card.cmm_used += model.nbytes
        model_id = next(ids)
        models[model_id] = model
        bus.count("load")
        return model_id, 0

    def engine_unload(model_id: int) -> int:
        model = models.pop(model_id, None)
        if model is None:
            return FAIL
        card.cmm_used -= model.nbytes
        return 0

    def engine_create_context(model_id: int) -> tuple[int, int]:
        if model_id not in models:
            return 0, FAIL
        ctx = next(ids)
        contexts.add(ctx)
        return ctx, 0

    def engine_get_io_info(model_id: int) -> tuple[int, int]:
        if model_id not in models:
            return 0, FAIL
        info = next(ids)
        infos[info] = model_id
        return info, 0

    def engine_destroy_io_info(io_info: int) -> int:
        return 0 if infos.pop(io_info, None) is not None else FAIL

    def model_of(io_info: int) -> SimModel | None:
        model_id = infos.get(io_info)
        return models.get(model_id) if model_id is not None else None

    def engine_get_shape_groups_count(io_info: int) -> tuple[int, int]:
        model = model_of(io_info)
        return (len(model.inputs), 0) if model else (0, FAIL)

    def side(io_info: int, outputs: bool) -> list[list[Any]] | None:
        model = model_of(io_info)
        if model is None:
            return None
        host("query")
        return model.outputs if outputs else model.inputs  # type: ignore[return-value]

    def num(outputs: bool):  # type: ignore[no-untyped-def]
        def get(io_info: int) -> int:
            groups = side(io_info, outputs)
            return len(groups[0]) if groups else 0
        return get

    def name(outputs: bool):  # type: ignore[no-untyped-def]
        def get(io_info: int, index: int) -> str:
            groups = side(io_info, outputs)
            return groups[0][index].name if groups and index < len(groups[0]) else ""
        return get

    def dims(outputs: bool):  # type: ignore[no-untyped-def]
        def get(io_info: int, group: int, index: int) -> tuple[list[int], int]:
            groups = side(io_info, outputs)
            if not groups or not 0 <= group < len(groups) or index >= len(groups[group]):
                return [], FAIL
            return list(groups[group][index].shape), 0
        return get

    def data_type(outputs: bool):  # type: ignore[no-untyped-def]
        def get(io_info: int, index: int) -> tuple[int, int]:
            groups = side(io_info, outputs)
            if not groups or index >= len(groups[0]):
                return 0, FAIL
            return DATA_TYPES[groups[0][index].dtype], 0
        return get

    def size(outputs: bool):  # type: ignore[no-untyped-def]
        def get(io_info: int, group: int, index: int) -> int:
            groups = side(io_info, outputs)
            if not groups or not 0 <= group < len(groups) or index >= len(groups[group]):
                return 0
            node = groups[group][index]
            return int(math.prod(node.shape) * node.dtype.itemsize)
        return get

    def engine_create_io(io_info: int) -> tuple[int, int]:
        if io_info not in infos:
            return 0, FAIL
        io = next(ids)
        ios[io] = IO(io_info)
        host("create_io")
        return io, 0

    def engine_destroy_io(io: int) -> int:
        return 0 if ios.pop(io, None) is not None else FAIL

    def bind(outputs: bool):  # type: ignore[no-untyped-def]
        def set_buffer(io: int, index: int, data_buffer: int, size: int) -> int:
            handle = ios.get(io)
            model = model_of(handle.info) if handle else None
            count = len((model.outputs if outputs else model.inputs)[0]) if model else 0
            if handle is None or not 0 <= index < count or mem.view(data_buffer, size) is None:
                return FAIL
            (handle.outputs if outputs else handle.inputs)[index] = (data_buffer, size)
            host("set_buffer")
            return 0
        return set_buffer

    def bound_views(bound: dict[int, tuple[int, int]], nodes: list[Any]) -> list[np.ndarray] | None:
        """The bytes each declared tensor occupies at the start of its bound buffer; None when a
        buffer is missing or smaller than the group declares (ax-llm's ``set_input`` refuses it)."""
        views = []
        for index, node in enumerate(nodes):
            need = int(math.prod(node.shape) * node.dtype.itemsize)
            buffer = bound.get(index)
            view = mem.view(buffer[0], need) if buffer is not None and buffer[1] >= need else None
            if view is None:
                return None
            views.append(view)
        return views

    def engine_execute(model_id: int, context_id: int, group: int, io: int) -> int:
        model, handle = models.get(model_id), ios.get(io)
        if model is None or handle is None or context_id not in contexts or not ready():
            return FAIL
        if not 0 <= group < len(model.inputs):
            return FAIL
        sources = bound_views(handle.inputs, model.inputs[group])
        targets = bound_views(handle.outputs, model.outputs[group])
        if sources is None or targets is None:
            return FAIL
        feeds = {node.name: view.view(node.dtype).reshape(node.shape).copy()
                 for node, view in zip(model.inputs[group], sources, strict=True)}
        if card.execute() != 0:
            return NO_CONNECTION
        bus.count("execute")
        bus.runs.append((model.name, group))
        for target, result in zip(targets, model.compute(group, feeds), strict=True):
            target[:] = np.ascontiguousarray(result).view(np.uint8).reshape(-1)
        return 0

    for fn in (get_device_list, set_device, create_context, destroy_context, set_current_context, malloc,
               free, memset, memcpy, engine_init, engine_finalize, engine_load_from_file, engine_unload,
               engine_create_context, engine_get_io_info, engine_destroy_io_info,
               engine_get_shape_groups_count,
               engine_create_io, engine_destroy_io, engine_execute):
        setattr(rt, fn.__name__, fn)
    rt.engine_get_num_inputs, rt.engine_get_num_outputs = num(False), num(True)  # type: ignore[attr-defined]
    rt.engine_get_input_name_by_index = name(False)  # type: ignore[attr-defined]
    rt.engine_get_output_name_by_index = name(True)  # type: ignore[attr-defined]
    rt.engine_get_input_dims, rt.engine_get_output_dims = dims(False), dims(True)  # type: ignore[attr-defined]
    rt.engine_get_input_data_type = data_type(False)  # type: ignore[attr-defined]
    rt.engine_get_output_data_type = data_type(True)  # type: ignore[attr-defined]
    rt.engine_get_input_size_by_index = size(False)  # type: ignore[attr-defined]
    rt.engine_get_output_size_by_index = size(True)  # type: ignore[attr-defined]
    rt.engine_set_input_buffer_by_index = bind(False)  # type: ignore[attr-defined]
    rt.engine_set_output_buffer_by_index = bind(True)  # type: ignore[attr-defined]

    def leaks() -> dict[str, int]:
        """What was made and never released: device buffers, IOs, IO infos, models, contexts."""
        return {"buffers": len(mem.blocks), "ios": len(ios), "io_infos": len(infos), "models": len(models),
                "contexts": len(device_contexts)}

    module = types.ModuleType("axcl")
    module.rt = rt  # type: ignore[attr-defined]
    module.init, module.finalize = init, finalize  # type: ignore[attr-defined]
    module.AXCL_MEM_MALLOC_NORMAL_ONLY = 2  # type: ignore[attr-defined]
    module.AXCL_MEMCPY_HOST_TO_HOST, module.AXCL_MEMCPY_HOST_TO_DEVICE = H2H, H2D  # type: ignore[attr-defined]
    module.AXCL_MEMCPY_DEVICE_TO_HOST, module.AXCL_MEMCPY_DEVICE_TO_DEVICE = D2H, D2D  # type: ignore[attr-defined]
    module.card, module.bus, module.leaks, module.memory = card, bus, leaks, mem  # type: ignore[attr-defined]
    return module
