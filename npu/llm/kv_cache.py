"""Host-side KV cache in the AXERA per-layer layout.

One ``LayerKVCache`` per decoder layer holds ``(1, capacity, kv_dim)`` keys and values, exactly
the ``K_cache``/``V_cache`` inputs of the decode shape group, so a decode step feeds the buffers
as they are and writes back one row. ``SequenceCache`` groups the layers of one conversation with
the tokens whose rows are stored (for prefix reuse) and the decode mask. A device-resident
implementation (rows kept on the NPU, one row copied per token) replaces ``LayerKVCache`` behind
the same operations: ``history``, ``full``, ``write``, ``write_row`` and ``nbytes``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

MASKED = -65536.0


class CacheMemoryError(RuntimeError):
    """A conversation's KV cache does not fit the device's memory; the message says how much."""


class LayerCache(Protocol):
    capacity: int

    def history(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` rows (prefill history), shaped ``(1, n, kv_dim)``."""
        ...

    def full(self) -> tuple[np.ndarray, np.ndarray]:
        """All ``capacity`` rows (decode inputs), shaped ``(1, capacity, kv_dim)``."""
        ...

    def write(self, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Store rows ``(1, n, kv_dim)`` at positions ``start .. start + n``."""
        ...

    def write_row(self, pos: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Store one decode row ``(1, 1, kv_dim)`` at ``pos`` (the per-token hot path)."""
        ...

    @property
    def nbytes(self) -> int: ...


class LayerKVCache:
    """Pre-allocated host buffers for one layer."""

    def __init__(self, capacity: int, kv_dim: int, dtype: np.dtype) -> None:
        self.capacity = capacity
        self.keys = np.zeros((1, capacity, kv_dim), dtype=dtype)
        self.values = np.zeros((1, capacity, kv_dim), dtype=dtype)

    def history(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[:, :n], self.values[:, :n]

    def full(self) -> tuple[np.ndarray, np.ndarray]:
        return self.keys, self.values

    def write(self, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        n = keys.shape[1]
        self.keys[:, start : start + n] = keys
        self.values[:, start : start + n] = values

    def write_row(self, pos: int, keys: np.ndarray, values: np.ndarray) -> None:
        self.keys[0, pos] = keys[0, 0]
        self.values[0, pos] = values[0, 0]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def prefill_feeds(
    start: int, n: int, chunk: int, history: int, mask_dtype: np.dtype, indices_dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` and ``mask`` of a prefill chunk of ``n`` tokens at ``start``.

    The mask's columns are the group's ``history`` rows then the chunk's own: a real token
    attends to the stored rows (columns below ``start``; history columns beyond them are unused)
    and causally to the chunk; padded rows attend to nothing. Padded positions are 0, as AXERA's
    scripts pad them.
    """
    indices = np.zeros((1, chunk), dtype=indices_dtype)
    indices[0, :n] = np.arange(start, start + n)
    rows = np.arange(chunk)[:, None]
    cols = np.arange(history + chunk)[None, :]
    attend = ((cols < start) | ((cols >= history) & (cols - history <= rows))) & (rows < n)
    return indices, np.where(attend, 0.0, MASKED).astype(mask_dtype)[None]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    left = np.asarray(a[:n], dtype=np.int64)
    right = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(left != right)
    return int(diff[0]) if diff.size else n


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int], chunk: int) -> int:
    """Rows of a cached sequence a new prompt may keep: whole prefill chunks of the common prefix.

    At least the prompt's last token is always recomputed, since its hidden state gives the
    logits of the first new token.
    """
    usable = min(common_prefix_length(cached, prompt), len(prompt) - 1)
    return max(0, usable // chunk * chunk)


class SequenceCache:
    """The KV rows of one token sequence across all layers, plus its decode masks.

    Invariant: ``tokens`` are exactly the tokens whose rows are stored, in positions
    ``0 .. len(tokens)``; each decode mask (one per decode group's capacity ``c``, shaped
    ``(1, 1, c + 1)``) attends to those rows and to the current token (its last column) and
    masks the rest.
    """

    def __init__(self, layers: list[LayerCache], dtype: np.dtype) -> None:
        if not layers:
            raise ValueError("a sequence cache needs at least one layer")
        self.layers = layers
        self.capacity = layers[0].capacity
        self.dtype = np.dtype(dtype)
        self.tokens: list[int] = []
        self._masks: dict[int, np.ndarray] = {}
        self.decode_feeds: dict[int, list[dict[str, np.ndarray]]] = {}  # by group, built by the stack

    @property
    def decode_mask(self) -> np.ndarray:
        """The mask of a decode over the whole capacity."""
        return self.decode_mask_for(self.capacity)

    def decode_mask_for(self, rows: int) -> np.ndarray:
        """The decode mask of a group attending to ``rows`` cache rows (kept up to date in place)."""
        mask = self._masks.get(rows)
        if mask is None:
            if not 0 < rows <= self.capacity:
                raise ValueError(f"a decode group of {rows} rows does not fit a cache of {self.capacity}")
            mask = np.full((1, 1, rows + 1), MASKED, dtype=self.dtype)
            mask[..., rows] = 0
            mask[..., : min(self.offset, rows)] = 0
            self._masks[rows] = mask
        return mask

    @property
    def offset(self) -> int:
        return len(self.tokens)

    @property
    def free(self) -> int:
        return self.capacity - self.offset

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def trim(self, n: int) -> None:
        """Forget every row from position ``n`` on."""
        n = max(0, min(n, self.offset))
        for rows, mask in self._masks.items():
            mask[..., n:rows] = MASKED
        del self.tokens[n:]

    def commit(self, start: int, token_ids: Sequence[int]) -> None:
        """Record that rows ``start .. start + len(token_ids)`` now hold these tokens."""
        if start != self.offset:
            raise ValueError(f"rows must be appended at {self.offset}, not {start}")
        end = start + len(token_ids)
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} rows needed, {self.capacity} available")
        self.tokens.extend(int(t) for t in token_ids)
        for rows, mask in self._masks.items():
            mask[..., start : min(end, rows)] = 0


class CachePool:
    """A few sequence caches, handed to one generation at a time.

    ``acquire`` prefers the free cache sharing the longest prefix with the new prompt (a chat turn
    resends the whole history), else the least recently used one, so concurrent conversations
    each keep their own prefix warm.
    """

    def __init__(self, slots: int, make_cache: Callable[[], SequenceCache]) -> None:
        if slots < 1:
            raise ValueError("a cache pool needs at least one slot")
        self._make_cache = make_cache
        self._free: list[SequenceCache] = []
        self._created = 0
        self._slots = slots
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)

    @property
    def slots(self) -> int:
        return self._slots

    def _pick(self, prompt: Sequence[int]) -> SequenceCache | None:
        """Called with the lock held."""
        if self._free:
            prefixes = [common_prefix_length(c.tokens, prompt) for c in self._free]
            best = max(range(len(prefixes)), key=lambda i: (prefixes[i], -i))
            return self._free.pop(best if prefixes[best] > 0 else 0)
        if self._created < self._slots:
            self._created += 1
            return self._make_cache()
        return None

    def try_acquire(self, prompt: Sequence[int]) -> SequenceCache | None:
        """A cache for ``prompt``, or ``None`` when every slot is in use."""
        with self._lock:
            return self._pick(prompt)

    def acquire(self, prompt: Sequence[int], timeout: float | None = None) -> SequenceCache:
        """A cache for ``prompt``, waiting up to ``timeout`` seconds for a slot to free up."""
        with self._cond:
            cache = self._pick(prompt)
            while cache is None:
                if not self._cond.wait(timeout):
                    raise TimeoutError("no KV cache slot became free")
                cache = self._pick(prompt)
            return cache

    def release(self, cache: SequenceCache) -> None:
        with self._cond:
            self._free.append(cache)
            self._cond.notify()
