"""A stand-in for PyAXEngine that behaves like the real one where the appliance depends on it.

The real ``axengine.InferenceSession`` runs a compiled ``.axmodel`` whose shape groups have
static shapes and bf16 tensors, asserts that every feed matches its group exactly, takes the
device from ``provider_options=[{"device_id": n}]`` only, and returns outputs in model order
when ``output_names`` is ``None``. This fake enforces the same rules and computes the numbers
with ONNX Runtime from the ``.onnx`` file stored under the ``.axmodel`` name, so the runner's
NPU code path runs end to end on a machine without the card.
"""

from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnxruntime as ort

BF16 = np.dtype(ml_dtypes.bfloat16)
AXCLRT = "AXCLRTExecutionProvider"


@dataclass
class NodeArg:
    name: str
    dtype: np.dtype
    shape: list[int]


@dataclass
class Record:
    """Every session created and every run, for the tests to inspect."""

    sessions: list[dict[str, Any]] = field(default_factory=list)
    runs: list[tuple[str, int]] = field(default_factory=list)


def _layer_groups(cfg: dict[str, Any]) -> list[tuple[list[NodeArg], list[NodeArg]]]:
    hidden, kv_dim = cfg["hidden_size"], cfg["head_dim"] * cfg["num_key_value_heads"]
    cap, chunk = cfg["kv_cache_len"], cfg["prefill_chunk"]
    outs = lambda t: [  # noqa: E731
        NodeArg("K_cache_out", BF16, [1, t, kv_dim]),
        NodeArg("V_cache_out", BF16, [1, t, kv_dim]),
        NodeArg("output", BF16, [1, t, hidden]),
    ]
    groups = [(
        [
            NodeArg("K_cache", BF16, [1, cap, kv_dim]),
            NodeArg("V_cache", BF16, [1, cap, kv_dim]),
            NodeArg("indices", np.dtype(np.uint32), [1, 1]),
            NodeArg("input", BF16, [1, 1, hidden]),
            NodeArg("mask", BF16, [1, 1, cap + 1]),
        ],
        outs(1),
    )]
    for s in range(cfg["max_prefill_chunks"]):
        hist = chunk * s if s else 1
        groups.append((
            [
                NodeArg("K_cache", BF16, [1, hist, kv_dim]),
                NodeArg("V_cache", BF16, [1, hist, kv_dim]),
                NodeArg("indices", np.dtype(np.uint32), [1, chunk]),
                NodeArg("input", BF16, [1, chunk, hidden]),
                NodeArg("mask", BF16, [1, chunk, chunk * (s + 1)]),
            ],
            outs(chunk),
        ))
    return groups


def make_module(record: Record, *, providers: list[str] | None = None) -> types.ModuleType:
    """Build an ``axengine`` module object; install it with ``monkeypatch.setitem(sys.modules, ...)``."""
    available = providers if providers is not None else [AXCLRT]

    class InferenceSession:
        def __init__(
            self,
            path_or_bytes: str,
            sess_options: Any = None,
            providers: list[str] | None = None,
            provider_options: list[dict[str, Any]] | None = None,
            **kwargs: Any,
        ) -> None:
            device = 0  # like the real one: only provider_options carries the device
            if provider_options is not None and "device_id" in provider_options[0]:
                device = provider_options[0]["device_id"]
            record.sessions.append(
                {"path": path_or_bytes, "providers": providers, "device_id": device, "kwargs": kwargs}
            )
            path = Path(path_or_bytes)
            if not path.is_file():
                raise RuntimeError("axclrtEngineLoadFromFile failed.")
            cfg = json.loads((path.parent / "config.json").read_text())
            self._name = path.name
            self._ort = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            if path.stem.endswith("_post"):
                self._groups = [(
                    [NodeArg("input", BF16, [1, 1, cfg["hidden_size"]])],
                    [NodeArg("output", np.dtype(np.float32), [1, 1, cfg["vocab_size"]])],
                )]
            else:
                self._groups = _layer_groups(cfg)

        def get_inputs(self, shape_group: int = 0) -> list[NodeArg]:
            if shape_group > len(self._groups):
                raise ValueError(f"Shape group '{shape_group}' is out of range, total {len(self._groups)}.")
            return self._groups[shape_group][0]

        def get_outputs(self, shape_group: int = 0) -> list[NodeArg]:
            if shape_group > len(self._groups):
                raise ValueError(f"Shape group '{shape_group}' is out of range, total {len(self._groups)}.")
            return self._groups[shape_group][1]

        def run(
            self,
            output_names: list[str] | None,
            input_feed: dict[str, np.ndarray],
            run_options: Any = None,
            shape_group: int = 0,
        ) -> list[np.ndarray]:
            if not 0 <= shape_group < len(self._groups):
                raise ValueError(f"Invalid shape group: {shape_group}")
            inputs, outputs = self._groups[shape_group]
            for node in inputs:
                npy = input_feed[node.name]
                assert list(npy.shape) == node.shape and npy.dtype == node.dtype, (
                    f"model inputs({node.name}) expect shape {node.shape} and dtype {node.dtype}, "
                    f"howerver gets input with shape {list(npy.shape)} and dtype {npy.dtype}"
                )
            record.runs.append((self._name, shape_group))
            feeds = {
                k: v.astype(np.float32) if v.dtype == BF16 else v for k, v in input_feed.items()
            }
            results = self._ort.run(None, feeds)
            return [r.astype(node.dtype) for r, node in zip(results, outputs, strict=True)]

    module = types.ModuleType("axengine")
    module.InferenceSession = InferenceSession  # type: ignore[attr-defined]
    module.get_available_providers = lambda: list(available)  # type: ignore[attr-defined]
    return module


def make_npu_bundle(onnx_bundle: Path, dest: Path) -> Path:
    """Copy a converted bundle with every ``.onnx`` renamed ``.axmodel``, as an NPU bundle looks."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in onnx_bundle.iterdir():
        if item.is_file():
            target = dest / (item.stem + ".axmodel" if item.suffix == ".onnx" else item.name)
            target.write_bytes(item.read_bytes())
    return dest
