"""A simulated PyAXEngine and LLM8850 card, written from upstream's behaviour, not from ours.

Each rule follows AXERA-TECH/pyaxengine at commit 3554448 (``axengine/``); the runner under test
must read what this runtime declares, so where AXERA's compiled models vary (placeholder shapes,
several decode groups, group order, dtypes) the fake varies too, through ``Layout``.

Import and providers
- ``__init__.py:15-19``: the module imports only where a provider library exists, else
  ``ImportError("No providers found ...")``; it prints ``[INFO] Available providers:``. Tests put
  ``None`` in ``sys.modules`` for the missing case.
- ``_providers.py:36-41``: ``get_all_providers()`` and ``get_available_providers()``.

``InferenceSession`` (``_session.py:19-83``)
- ``providers=None`` takes the first available provider; a list takes its first available entry;
  a ``(name, options)`` tuple's options are kept aside (line 64) and never reach the session,
  which receives ``provider_options`` as given (line 78). An unavailable provider alone is a
  ``ValueError`` (line 67).
- It prints ``[INFO] Using provider: ...`` (line 74).

The AXCLRT session (``_axclrt.py``)
- Line 49-54, 69: the AXCL runtime is initialised on the first import of ``_axclrt``; a failed
  ``axclInit`` is ``RuntimeError("Failed to initialize axcl runtime. <ret>.")`` (the card's driver
  not loaded: ``Card.driver_loaded = False``).
- Line 98-103: the device is ``provider_options[0]["device_id"]``, an index, default 0.
- Line 105-111: ``axclrtGetDeviceList``; no device is ``RuntimeError("Get AXCL device failed
  0x..., find total 0 device.")``; an index past the list is ``RuntimeError("Device index N is
  out of range, total M device.")``. The list holds PCIe bus numbers (``Card.ids``, 1 on a Pi 5).
- Line 139-164: ``[INFO]``/``[WARNING]`` prints while a session loads (SOC name, VNPU type,
  compiler version).
- Line 181-187: a path that cannot be loaded is ``RuntimeError("axclrtEngineLoadFromFile
  failed.")``.
- Line 175-179, 214-228: every session is kept in the module-level ``_all_model_instances``
  until exit; ``_unload`` frees its IO buffers and unloads the model and is idempotent. The card
  counts the CMM a session holds (its weights, the file size here, plus its IO buffers).
- Line 249-297: inputs and outputs are declared per shape group with a name, a numpy dtype
  (line 29-47: bf16 is ``ml_dtypes.bfloat16``; uint8, lines 30-31, is Kokoro's ``text_mask``) and a
  static shape. The compiled groups are read
  from the model file itself: here, the ``axmodel.groups`` metadata of the ONNX file that stands
  for the ``.axmodel`` (``make_npu_bundle``).
- Line 299-328: one device buffer per input and output, sized for the largest group.
- ``_base_session.py:40-50``: ``get_inputs(g)``/``get_outputs(g)`` raise ``ValueError`` only
  for ``g > count``; ``g == count`` is the list's ``IndexError``; a negative ``g`` indexes from
  the end, as a Python list does.

``run(output_names, input_feed, run_options=None, shape_group=0)`` (``_axclrt.py:330-394``)
- ``_base_session.py:25-38``: every input of group 0 must be in the feed (``ValueError``
  otherwise) and every named output must be one of group 0's (``ValueError``).
- Line 344-348: ``None`` names become the group's outputs (``get_outputs``, so
  ``shape_group == count`` is an ``IndexError`` here), then a group out of range is
  ``ValueError("Invalid shape group: g")``.
- Line 353-368: for each fed name that the group declares, ``assert list(shape) == list(npy.shape)
  and dtype == npy.dtype`` with upstream's message, then ``npy.nbytes`` are copied host to
  device (counted in ``Record.h2d_bytes``); fed names the group does not declare are ignored.
- Line 371, 393-394: a failed execution is ``RuntimeError("axclrtEngineExecute failed 0x...")``
  (``Card.fault = "dead"``); a hung card never returns (``Card.fault = "hang"``, until released).
- Line 375-376: ``output_names.index`` is taken for every declared output, so a subset of names
  is a ``ValueError``; line 377-392: every output is copied device to host in full
  (``Record.d2h_bytes``).

The numbers come from ONNX Runtime running the same graph on fp32 copies of the feeds, and are
returned in the declared dtypes. A prefill group without history has no mask column for its
``K_cache``/``V_cache`` placeholder, so the compiled model ignores it: the fake feeds the graph an
empty history instead of the placeholder, whatever its declared shape.
"""

from __future__ import annotations

import json
import math
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort

BF16 = np.dtype(ml_dtypes.bfloat16)
AXCLRT = "AXCLRTExecutionProvider"
AXENGINE = "AxEngineExecutionProvider"
GROUPS_KEY = "axmodel.groups"
DTYPES = {"bfloat16": BF16, "float32": np.dtype(np.float32), "uint32": np.dtype(np.uint32),
          "int32": np.dtype(np.int32),  # _axclrt.py:40-41 (Whisper's token, offset and mask)
          "uint8": np.dtype(np.uint8)}  # _axclrt.py:30-31 (Kokoro's text_mask)


@dataclass
class Card:
    """The simulated card(s) behind the runtime: bus numbers, driver state, faults, CMM."""

    ids: list[int] = field(default_factory=lambda: [1])
    driver_loaded: bool = True
    fault: str = "none"  # none | hang | dead
    cmm_used: int = 0
    released: threading.Event = field(default_factory=threading.Event)

    def execute(self) -> int:
        if self.fault == "hang":
            self.released.wait(30.0)
        return 0x80300181 if self.fault == "dead" else 0


@dataclass
class Record:
    """Every session created and every run, for the tests to inspect."""

    sessions: list[dict[str, Any]] = field(default_factory=list)
    runs: list[tuple[str, int]] = field(default_factory=list)
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    d2d_bytes: int = 0
    calls: dict[str, int] = field(default_factory=dict)  # by kind: h2d, d2h, d2d, execute, other
    prints: list[str] = field(default_factory=list)

    def count(self, kind: str, nbytes: int = 0) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if kind in ("h2d", "d2h", "d2d"):
            setattr(self, f"{kind}_bytes", getattr(self, f"{kind}_bytes") + nbytes)

    def snapshot(self) -> dict[str, int]:
        return {"h2d_bytes": self.h2d_bytes, "d2h_bytes": self.d2h_bytes, "d2d_bytes": self.d2d_bytes,
                **self.calls}


@dataclass
class NodeArg:
    """``axengine/_node.py``: name, dtype and shape (a list)."""

    name: str
    dtype: np.dtype
    shape: list[int]


@dataclass(frozen=True)
class Layout:
    """How a compiled bundle declares its groups, as AXERA's models do in their variations.

    ``decode`` lists the decode groups' capacities in group order (several contexts, the largest
    not necessarily first); ``prefill`` the prefill groups' history rows (``None``: 0, chunk,
    2 chunk ... up to the largest decode capacity); ``placeholder`` the first chunk's
    ``K_cache`` width (``kv_dim``, or ``hidden`` as several of AXERA's models declare it);
    ``decode_first`` puts the decode groups before the prefill ones.
    """

    decode: tuple[int, ...] = (1023,)
    prefill: tuple[int, ...] | None = None
    chunk: int = 128
    placeholder: str = "kv_dim"
    dtype: str = "bfloat16"
    decode_first: bool = True
    kv_dim: int | None = None  # declare another kv_dim than config.json's (a broken bundle)

    def groups(self, hidden: int, kv_dim: int) -> list[dict[str, list[list[Any]]]]:
        kv = self.kv_dim or kv_dim
        dt, chunk = self.dtype, self.chunk
        histories = self.prefill
        if histories is None:
            histories = tuple(range(0, max(self.decode) - chunk + 1, chunk))
        decode = [
            {
                "inputs": [["K_cache", dt, [1, c, kv]], ["V_cache", dt, [1, c, kv]],
                           ["indices", "uint32", [1, 1]], ["input", dt, [1, 1, hidden]],
                           ["mask", dt, [1, 1, c + 1]]],
                "outputs": [["K_cache_out", dt, [1, 1, kv]], ["V_cache_out", dt, [1, 1, kv]],
                            ["output", dt, [1, 1, hidden]]],
            }
            for c in self.decode
        ]
        place = [1, 1, hidden if self.placeholder == "hidden" else kv]
        hist = lambda h: [1, h, kv] if h else place  # noqa: E731
        prefill = [
            {
                "inputs": [["K_cache", dt, hist(h)], ["V_cache", dt, hist(h)],
                           ["indices", "uint32", [1, chunk]], ["input", dt, [1, chunk, hidden]],
                           ["mask", dt, [1, chunk, h + chunk]]],
                "outputs": [["K_cache_out", dt, [1, chunk, kv]], ["V_cache_out", dt, [1, chunk, kv]],
                            ["output", dt, [1, chunk, hidden]]],
            }
            for h in histories
        ]
        return decode + prefill if self.decode_first else prefill + decode


def make_npu_bundle(onnx_bundle: Path, dest: Path, layout: Layout | None = None) -> Path:
    """A converted bundle as AXERA ships it: ``.axmodel`` files declaring static shape groups.

    Each ``.axmodel`` is the ONNX graph with the groups of ``layout`` in its metadata, its
    weights inside it; the CPU twin's extras (the embedding's fp32 ``.npy``, the twin graph and
    the weights file the graphs share) are left out.
    """
    layout = layout or Layout()
    cfg = json.loads((onnx_bundle / "config.json").read_text())
    hidden, kv_dim = cfg["hidden_size"], cfg["head_dim"] * cfg["num_key_value_heads"]
    dest.mkdir(parents=True, exist_ok=True)
    for item in onnx_bundle.iterdir():
        if not item.is_file() or item.suffix == ".npy" or item.name.endswith(("_twin.onnx", "_weights.bin")):
            continue
        if item.suffix != ".onnx":
            (dest / item.name).write_bytes(item.read_bytes())
            continue
        model = onnx.load(str(item))
        if item.stem.endswith("_post"):
            groups = post_groups(layout, hidden, cfg["vocab_size"])
        else:
            groups = layout.groups(hidden, kv_dim)
        entry = model.metadata_props.add()
        entry.key, entry.value = GROUPS_KEY, json.dumps(groups)
        onnx.save(model, str(dest / f"{item.stem}.axmodel"))
    return dest


def post_groups(layout: Layout, hidden: int, vocab: int) -> list[dict[str, list[list[Any]]]]:
    """The post model: the last hidden state in, logits out, in the layout's dtype (ax-llm reads
    them as bf16: ``unsigned short *post_out`` in ``src/runner/LLM_decode.cpp``)."""
    dt = layout.dtype
    return [{"inputs": [["input", dt, [1, 1, hidden]]], "outputs": [["output", dt, [1, 1, vocab]]]}]


def make_shape_bundle(dest: Path, config: dict[str, Any], layout: Layout, prefix: str = "qwen2") -> Path:
    """A bundle with a large model's declared shapes and no weights (its numbers are zeros).

    Enough to drive the layer stack and count the bytes each path moves over the bus, for models
    too large to convert here (``config`` is a Hugging Face ``config.json``).
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config))
    hidden = config["hidden_size"]
    kv_dim = config.get("head_dim", hidden // config["num_attention_heads"]) * config["num_key_value_heads"]

    def write(name: str, groups: list[dict[str, list[list[Any]]]]) -> None:
        model = onnx.helper.make_model(onnx.helper.make_graph([], name, [], []))
        entry = model.metadata_props.add()
        entry.key, entry.value = GROUPS_KEY, json.dumps(groups)
        onnx.save(model, str(dest / f"{name}.axmodel"))

    for i in range(config["num_hidden_layers"]):
        write(f"{prefix}_p{layout.chunk}_l{i}_together", layout.groups(hidden, kv_dim))
    write(f"{prefix}_post", post_groups(layout, hidden, config["vocab_size"]))
    return dest


def _declared(path: Path) -> list[tuple[list[NodeArg], list[NodeArg]]]:
    model = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if GROUPS_KEY not in meta:
        raise RuntimeError("axclrtEngineLoadFromFile failed.")
    return [
        ([NodeArg(n, DTYPES[d], list(s)) for n, d, s in g["inputs"]],
         [NodeArg(n, DTYPES[d], list(s)) for n, d, s in g["outputs"]])
        for g in json.loads(meta[GROUPS_KEY])
    ]


class SimModel:
    """A compiled model's declared groups and its numbers (ONNX Runtime on the graph in the file).

    A file whose graph has no outputs stands for a model whose shapes matter and whose numbers do
    not (benchmarks of bus traffic on large models' shapes): it returns zeros of the declared
    shapes.
    """

    def __init__(self, path: Path) -> None:
        groups = _declared(path)
        self.name = path.name
        self.inputs = [g[0] for g in groups]
        self.outputs = [g[1] for g in groups]
        graph = onnx.load(str(path), load_external_data=False).graph
        self._ort: ort.InferenceSession | None = None
        if graph.output:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.log_severity_level = 3
            self._ort = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.nbytes = path.stat().st_size

    def io_bytes(self) -> int:
        """Device buffers sized for the largest group, one per input and output (as PyAXEngine)."""
        return sum(
            max(math.prod(n.shape) * n.dtype.itemsize for n in (grp[i] for grp in side))
            for side in (self.inputs, self.outputs) for i in range(len(side[0]))
        )

    def compute(self, group: int, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        outs = self.outputs[group]
        if self._ort is None:
            return [np.zeros(o.shape, o.dtype) for o in outs]
        results = self._ort.run(None, self._graph_feeds(feed, group))
        return [r.astype(o.dtype) for r, o in zip(results, outs, strict=True)]

    def _graph_feeds(self, feed: dict[str, np.ndarray], group: int) -> dict[str, np.ndarray]:
        names = {i.name for i in self.inputs[group]}
        feeds = {k: v.astype(np.float32) if v.dtype == BF16 else v for k, v in feed.items() if k in names}
        if "mask" in feeds and "indices" in feeds and feeds["indices"].size > 1:
            tokens = feeds["indices"].shape[-1]
            if feeds["mask"].shape[-1] == tokens:  # no history: the placeholder is not read
                kv = self.outputs[group][0].shape[-1]
                feeds["K_cache"] = feeds["V_cache"] = np.zeros((1, 1, kv), np.float32)
        return feeds


def make_module(
    record: Record | None = None, *, card: Card | None = None, providers: list[str] | None = None
) -> types.ModuleType:
    """An ``axengine`` module object; install it with ``monkeypatch.setitem(sys.modules, ...)``."""
    record = record if record is not None else Record()
    card = card if card is not None else Card()
    available = providers if providers is not None else [AXCLRT]
    axclrt = types.ModuleType("axengine._axclrt")
    axclrt._all_model_instances = []  # type: ignore[attr-defined]

    def say(text: str) -> None:
        record.prints.append(text)
        print(text)

    class AXCLRTSession:
        def __init__(self, path_or_bytes: Any, sess_options: Any, provider_options: Any,
                     **kwargs: Any) -> None:
            self._loaded = False
            if not card.driver_loaded:
                raise RuntimeError("Failed to initialize axcl runtime. -1.")
            self._device_index = 0
            if provider_options is not None and "device_id" in provider_options[0]:
                self._device_index = provider_options[0].get("device_id", 0)
            if not card.ids:
                raise RuntimeError("Get AXCL device failed 0x00000000, find total 0 device.")
            if self._device_index >= len(card.ids):
                raise RuntimeError(
                    f"Device index {self._device_index} is out of range, total {len(card.ids)} device."
                )
            self._device_id = card.ids[self._device_index]
            say("[INFO] SOC Name: AX650N")
            say("[INFO] VNPU type: VNPUType.DISABLED")
            path = Path(path_or_bytes)
            if not path.is_file():
                raise RuntimeError("axclrtEngineLoadFromFile failed.")
            self._model = SimModel(path)
            say("[INFO] Compiler version: 4.2 fake")
            self.name = path.name
            self._shape_count = len(self._model.inputs)
            self._inputs = self._model.inputs
            self._outputs = self._model.outputs
            self._cmm = self._model.nbytes + self._model.io_bytes()
            card.cmm_used += self._cmm
            self._loaded = True
            record.sessions.append({"path": str(path), "device_index": self._device_index,
                                    "device_id": self._device_id, "kwargs": kwargs})
            axclrt._all_model_instances.append(self)  # type: ignore[attr-defined]

        def _unload(self) -> None:
            if self._loaded:
                self._loaded = False
                card.cmm_used -= self._cmm

        def __del__(self) -> None:
            self._unload()
            if self in axclrt._all_model_instances:  # upstream raises here after a failed load
                axclrt._all_model_instances.remove(self)  # type: ignore[attr-defined]

        def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
            if shape_group > self._shape_count:
                raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
            return self._inputs[shape_group]

        def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
            if shape_group > self._shape_count:
                raise ValueError(f"Shape group '{shape_group}' is out of range, total {self._shape_count}.")
            return self._outputs[shape_group]

        def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
                run_options: Any = None, shape_group: int = 0) -> list[np.ndarray]:
            missing = [i.name for i in self.get_inputs() if i.name not in input_feed]
            if missing:
                raise ValueError(f"Required inputs ({missing}) are missing from input feed ({input_feed}).")
            if output_names is not None:
                for name in output_names:
                    if name not in [o.name for o in self.get_outputs()]:
                        raise ValueError(f"Output name '{name}' is not in model outputs name list.")
            if output_names is None:
                output_names = [o.name for o in self.get_outputs(shape_group)]
            if shape_group > self._shape_count - 1 or shape_group < 0:
                raise ValueError(f"Invalid shape group: {shape_group}")
            declared = self.get_inputs(shape_group)
            for key, npy in input_feed.items():
                for one in declared:
                    if one.name == key:
                        assert list(one.shape) == list(npy.shape) and one.dtype == npy.dtype, (
                            f"model inputs({key}) expect shape {one.shape} and dtype {one.dtype}, "
                            f"howerver gets input with shape {npy.shape} and dtype {npy.dtype}"
                        )
                        record.count("h2d", npy.nbytes)
            if not self._loaded:
                raise RuntimeError("axclrtEngineExecute failed 0x80300101")
            ret = card.execute()
            outputs_order = [output_names.index(o.name) for o in self.get_outputs(shape_group)]
            if ret != 0:
                raise RuntimeError(f"axclrtEngineExecute failed 0x{ret:08x}")
            record.runs.append((self.name, shape_group))
            record.count("execute")
            results = self._model.compute(shape_group, input_feed)
            out = [r for i, r in enumerate(results) if i in outputs_order]
            for array in out:
                record.count("d2h", array.nbytes)
            return out

    class InferenceSession:
        def __init__(self, path_or_bytes: Any, sess_options: Any = None,
                     providers: Any = None, provider_options: Any = None, **kwargs: Any) -> None:
            self._provider = None
            self._provider_options = None
            if providers is None:
                self._provider = available[0]
            elif isinstance(providers, str):
                if providers not in available:
                    raise ValueError(f"Selected provider: '{providers}' is not available.")
                self._provider = providers
            else:
                unavailable = []
                for p in providers:
                    name = p[0] if isinstance(p, tuple) else p
                    if name not in available:
                        unavailable.append(name)
                    elif self._provider is None:
                        self._provider = name
                        if isinstance(p, tuple):
                            self._provider_options = p[1]  # kept, never used
                if unavailable and self._provider is None:
                    raise ValueError(f"Selected provider(s): {unavailable} is(are) not available.")
            say(f"[INFO] Using provider: {self._provider}")
            self._sess = AXCLRTSession(path_or_bytes, sess_options, provider_options, **kwargs)

        def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
            return self._sess.get_inputs(shape_group)

        def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
            return self._sess.get_outputs(shape_group)

        def run(self, output_names: list[str] | None, input_feed: dict[str, np.ndarray],
                run_options: Any = None, shape_group: int = 0) -> list[np.ndarray]:
            return self._sess.run(output_names, input_feed, run_options, shape_group)

    AXCLRTSession.__module__ = axclrt.__name__
    axclrt.AXCLRTSession = AXCLRTSession  # type: ignore[attr-defined]
    module = types.ModuleType("axengine")
    module.InferenceSession = InferenceSession  # type: ignore[attr-defined]
    module.NodeArg = NodeArg  # type: ignore[attr-defined]
    module.get_available_providers = lambda: list(available)  # type: ignore[attr-defined]
    module.get_all_providers = lambda: [AXENGINE, AXCLRT]  # type: ignore[attr-defined]
    module._axclrt = axclrt  # type: ignore[attr-defined]
    module.record, module.card = record, card  # type: ignore[attr-defined]
    return module
