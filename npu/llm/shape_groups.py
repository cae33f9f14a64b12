"""What a bundle's decoder layers offer, read from the shape groups their sessions declare.

A compiled ``.axmodel`` holds several static shapes ("shape groups"). Which group is decode and
which is a prefill chunk, how many cache rows each attends to, and what it wants as the history
of the first chunk are facts of the compiled file, not of a naming convention, so they are read
here the way AXERA's own runner reads them (ax-llm ``src/runner/LLM_init.cpp``,
``LLM::Impl::init_groups_from_model``):

- a group whose ``indices`` holds one element is a decode group, else a prefill group whose
  chunk is the last dimension of ``indices``;
- a decode group attends to ``mask elements - 1`` cache rows; a model may carry several (2k,
  4k, 8k contexts), and group 0 need not be the largest, so they are sorted by capacity and the
  smallest that fits the sequence is used (``choose_decode_gid`` in ``LLMImpl.hpp``);
- a prefill group takes ``mask columns - chunk`` rows of history; they are sorted, and a chunk
  runs on the smallest group whose history holds the rows already stored
  (``select_prefill_group``), the unused history columns masked;
- a prefill group with no history still declares a ``K_cache``/``V_cache`` placeholder, whose
  shape varies between AXERA's models (``(1, 1, kv_dim)`` or ``(1, 1, hidden_size)``): it is fed
  zeros of exactly the declared shape, since PyAXEngine asserts every feed's shape and dtype
  (``axengine/_axclrt.py``, the assert in ``run``).

Where a declared shape cannot hold what the runner needs, the bundle is refused at load with a
message naming the file, the group, the input and both shapes. ONNX Runtime's twin bundles have
dynamic shapes; their plan is derived from ``config.json`` with the same group numbering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from npu.runtime.base import Session, TensorInfo

IN_NAMES = ("K_cache", "V_cache", "indices", "input", "mask")
OUT_NAMES = ("K_cache_out", "V_cache_out", "output")


class BundleShapeError(ValueError):
    """A compiled model declares shapes the runner cannot drive; the message says which."""


@dataclass(frozen=True)
class DecodeGroup:
    gid: int
    capacity: int  # cache rows it attends to; the current token is the mask's last column


@dataclass(frozen=True)
class PrefillGroup:
    gid: int
    chunk: int
    history: int  # cache rows it takes before the chunk
    placeholder: tuple[int, ...] | None  # the declared K_cache/V_cache shape when history == 0

    @property
    def total(self) -> int:
        return self.history + self.chunk


@dataclass(frozen=True)
class GroupPlan:
    """The decode and prefill groups of a bundle, each sorted by what it holds."""

    decode: tuple[DecodeGroup, ...]
    prefill: tuple[PrefillGroup, ...]
    chunk: int
    static: bool  # compiled groups (NPU) or one dynamic graph (ONNX Runtime)

    @property
    def capacity(self) -> int:
        """Cache rows of the largest decode group: the model's context."""
        return self.decode[-1].capacity

    def decode_for(self, rows: int) -> DecodeGroup:
        """The smallest decode group whose cache holds ``rows`` rows (the current token's included)."""
        for group in self.decode:
            if rows <= group.capacity:
                return group
        raise ValueError(f"{rows} cache rows exceed the largest decode group ({self.capacity})")

    def prefill_for(self, start: int) -> PrefillGroup:
        """The smallest prefill group whose history holds the ``start`` rows already stored."""
        for group in self.prefill:
            if start <= group.history:
                return group
        raise ValueError(
            f"no prefill group takes {start} rows of history (the largest takes {self.prefill[-1].history})"
        )

    @property
    def max_prompt_tokens(self) -> int:
        """Prompt tokens that fit: whole chunks up to the largest history, one row left to generate."""
        reachable = self.prefill[-1].history // self.chunk * self.chunk + self.chunk
        return min(reachable, self.capacity - 1)

    def describe(self) -> str:
        decode = ", ".join(f"{g.capacity} rows (group {g.gid})" for g in self.decode)
        histories = [g.history for g in self.prefill]
        first = self.prefill[0]
        placeholder = "x".join(map(str, first.placeholder)) if first.placeholder else "none"
        kind = "compiled groups" if self.static else "dynamic shapes"
        return (
            f"{kind}: decode {decode}; prefill {len(self.prefill)} groups of {self.chunk} tokens with "
            f"{_span(histories)} rows of history (first-chunk placeholder {placeholder}); "
            f"prompt up to {self.max_prompt_tokens} tokens"
        )


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def _numel(shape: Sequence[int | str | None]) -> int:
    return math.prod(int(d) for d in shape)  # type: ignore[arg-type]


def _fmt(shape: Sequence[int | str | None]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def count_groups(session: Session) -> int | None:
    """Shape groups a session declares; ``None`` for a session with dynamic shapes."""
    count = getattr(session, "group_count", None)
    return count if isinstance(count, int) else None


def declared_groups(session: Session) -> list[tuple[dict[str, TensorInfo], dict[str, TensorInfo]]]:
    """Inputs and outputs by name, for each declared group."""
    count = count_groups(session)
    if count is None:
        raise ValueError(f"{session.path} has dynamic shapes, not shape groups")
    return [
        ({t.name: t for t in session.get_inputs(g)}, {t.name: t for t in session.get_outputs(g)})
        for g in range(count)
    ]


class _Checker:
    """Compares declared shapes with what the runner needs, refusing with a precise message."""

    def __init__(self, path: str, hidden: int, kv_dim: int) -> None:
        self.path, self.hidden, self.kv_dim = path, hidden, kv_dim

    def need(self, gid: int, tensor: TensorInfo, shape: tuple[int, ...], why: str) -> None:
        if tuple(tensor.shape) != shape:
            raise BundleShapeError(
                f"{self.path}: shape group {gid} declares {tensor.name} {_fmt(tensor.shape)}, but the "
                f"runner needs {_fmt(shape)} ({why}); the bundle does not fit its config.json"
            )

    def names(self, gid: int, inputs: dict[str, TensorInfo], outputs: dict[str, TensorInfo]) -> None:
        missing = [n for n in IN_NAMES if n not in inputs] + [n for n in OUT_NAMES if n not in outputs]
        if missing:
            raise BundleShapeError(
                f"{self.path}: shape group {gid} lacks {', '.join(missing)} (has inputs "
                f"{sorted(inputs)}, outputs {sorted(outputs)}); not a decoder layer of AXERA's layout"
            )
        for name, tensor in (*inputs.items(), *outputs.items()):
            if any(not isinstance(d, int) or d < 0 for d in tensor.shape):
                raise BundleShapeError(f"{self.path}: shape group {gid} declares {name} {_fmt(tensor.shape)}")


def plan_static(
    path: str,
    groups: list[tuple[dict[str, TensorInfo], dict[str, TensorInfo]]],
    hidden: int,
    kv_dim: int,
) -> GroupPlan:
    """Classify and check the declared groups of one compiled decoder layer."""
    check = _Checker(path, hidden, kv_dim)
    decode: dict[int, DecodeGroup] = {}
    prefill: dict[int, PrefillGroup] = {}
    chunks: set[int] = set()
    for gid, (inputs, outputs) in enumerate(groups):
        check.names(gid, inputs, outputs)
        indices, mask, k, v = inputs["indices"], inputs["mask"], inputs["K_cache"], inputs["V_cache"]
        if indices.dtype.kind not in "iu":
            raise BundleShapeError(f"{path}: shape group {gid} declares indices as {indices.dtype}, not ints")
        if _numel(indices.shape) == 1:
            capacity = _numel(mask.shape) - 1
            for cache in (k, v):
                check.need(gid, cache, (1, capacity, kv_dim), f"decode over {capacity} rows, kv_dim {kv_dim}")
            check.need(gid, inputs["input"], (1, 1, hidden), f"hidden_size {hidden}")
            check.need(gid, outputs["K_cache_out"], (1, 1, kv_dim), f"kv_dim {kv_dim}")
            check.need(gid, outputs["V_cache_out"], (1, 1, kv_dim), f"kv_dim {kv_dim}")
            check.need(gid, outputs["output"], (1, 1, hidden), f"hidden_size {hidden}")
            decode.setdefault(capacity, DecodeGroup(gid, capacity))
            continue
        chunk = int(indices.shape[-1])
        chunks.add(chunk)
        if len(mask.shape) != 3 or mask.shape[1] != chunk or int(mask.shape[2]) < chunk:
            raise BundleShapeError(
                f"{path}: shape group {gid} declares mask {_fmt(mask.shape)} for a chunk of {chunk} "
                f"tokens; the runner needs (1, {chunk}, history + {chunk})"
            )
        history = int(mask.shape[2]) - chunk
        check.need(gid, indices, (1, chunk), f"a chunk of {chunk} positions")
        check.need(gid, inputs["input"], (1, chunk, hidden), f"a chunk of {chunk}, hidden_size {hidden}")
        check.need(gid, outputs["K_cache_out"], (1, chunk, kv_dim), f"kv_dim {kv_dim}")
        check.need(gid, outputs["V_cache_out"], (1, chunk, kv_dim), f"kv_dim {kv_dim}")
        check.need(gid, outputs["output"], (1, chunk, hidden), f"hidden_size {hidden}")
        placeholder: tuple[int, ...] | None = None
        if history:
            for cache in (k, v):
                check.need(gid, cache, (1, history, kv_dim), f"{history} rows of history, kv_dim {kv_dim}")
        else:
            if tuple(k.shape) != tuple(v.shape):
                raise BundleShapeError(
                    f"{path}: shape group {gid} declares K_cache {_fmt(k.shape)} and V_cache {_fmt(v.shape)}"
                )
            placeholder = tuple(int(d) for d in k.shape)
        prefill.setdefault(history, PrefillGroup(gid, chunk, history, placeholder))
    if not decode:
        raise BundleShapeError(f"{path}: no decode group (one whose indices holds one position)")
    if not prefill:
        raise BundleShapeError(f"{path}: no prefill group (one whose indices holds a chunk of positions)")
    if len(chunks) > 1:
        raise BundleShapeError(f"{path}: prefill groups of different chunk sizes {sorted(chunks)}")
    capacity = max(decode)
    usable = [prefill[h] for h in sorted(prefill) if h <= capacity]  # history must fit the cache
    plan = GroupPlan(tuple(decode[c] for c in sorted(decode)), tuple(usable), chunks.pop(), True)
    if plan.prefill[0].history != 0:
        raise BundleShapeError(f"{path}: no prefill group for the first chunk (one without history)")
    return plan


def plan_dynamic(kv_cache_len: int, chunk: int, prefill_chunks: int, kv_dim: int) -> GroupPlan:
    """The plan of a dynamic-shape twin: AXERA's numbering (0 decode, s + 1 chunk s), exact histories."""
    prefill = tuple(
        PrefillGroup(s + 1, chunk, s * chunk, (1, 1, kv_dim) if s == 0 else None)
        for s in range(prefill_chunks)
    )
    return GroupPlan((DecodeGroup(0, kv_cache_len),), prefill, chunk, False)


def same_groups(path: str, plan: GroupPlan, reference: GroupPlan, reference_path: str) -> None:
    """Every layer must offer the groups the first one does; else the bundle is refused."""
    if plan != reference:
        raise BundleShapeError(
            f"{path} declares other shape groups than {reference_path}: {plan.describe()} against "
            f"{reference.describe()}"
        )
