"""Choosing the next token on the host: logit filters, the draw, and the logits processors.

This runs once per decoded token on a Raspberry Pi 5 CPU with vocabularies of 49k-152k entries,
so no step sorts the vocabulary or scans it more often than it must:

- greedy decoding is one ``argmax``;
- the filters (top-k, top-p, min-p) each keep a tie-inclusive prefix of the tokens ranked by
  logit; inside the sampler they pass along the *support* (the ascending ids still alive)
  instead of rewriting a vocabulary-sized array at every stage. The public ``apply_*``
  functions run the same code and turn the support back into a dense ``-inf``-masked array,
  so ``make_sampler`` is exactly the chain ``apply_top_k -> apply_top_p -> apply_min_p``
  followed by the draw;
- threshold queries go through per-column maxima of a 64-row view of the vocabulary, so
  finding the few entries above a threshold does not cost two full passes;
- top-p finds its nucleus among a growing set of candidates instead of sorting everything;
- the draw inverts the CDF in two levels instead of a vocabulary-long cumulative sum.

Filters run on the raw logits and temperature is applied at the draw (the llama.cpp and mlx-lm
order), so top-p and min-p select the same tokens whatever the temperature.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np

from npu.llm.params import GenerationParams

logger = logging.getLogger(__name__)

Sampler = Callable[[np.ndarray], int]
Support = np.ndarray | None  # ascending ids of the entries still alive; None means every entry
SupportFilter = Callable[[np.ndarray, Support], Support]

# Below this many entries plain scans, partitions and sorts beat the column index.
_SMALL = 4096
# Rows of the column index: a vocabulary of n tokens is viewed as _ROWS x (n // _ROWS) plus a tail.
_ROWS = 64
# Top-p looks for its nucleus among tokens whose probability is at least this fraction of the
# largest one, widening the net step by step; the whole support is the last resort.
_TOP_P_LEVELS = (1e-2, 1e-4, 1e-7)


# --------------------------------------------------------------------------------------------
# Supports: the internal form of the filters


class _Columns:
    """A vocabulary-sized array viewed as ``_ROWS`` x ``cols`` (id = row * cols + col) plus a tail.

    The per-column maxima (one cheap vectorised pass) let a threshold query look only at the
    columns that can hold a value above it: ``numpy.flatnonzero`` over the whole vocabulary
    costs two full passes even when only a handful of entries qualify.
    """

    __slots__ = ("col_max", "cols", "grid", "head", "tail", "values")

    def __init__(self, values: np.ndarray) -> None:
        self.values = values
        self.cols = values.size // _ROWS
        self.head = self.cols * _ROWS
        self.grid = values[: self.head].reshape(_ROWS, self.cols)
        self.tail = values[self.head :]
        self.col_max = self.grid.max(axis=0)

    def at_least(self, threshold: np.floating) -> np.ndarray:
        """Ascending ids of every value ``>= threshold``."""
        cols = np.flatnonzero(self.col_max >= threshold)
        if 4 * cols.size > self.cols:  # most columns qualify: a plain scan is cheaper
            return np.flatnonzero(self.values >= threshold)
        ids = np.zeros(0, np.int64)
        if cols.size:
            flat = np.flatnonzero(self.grid[:, cols] >= threshold)
            rows, picked = np.divmod(flat, cols.size)
            ids = rows * self.cols + cols[picked]
        if self.tail.size:
            ids = np.concatenate((ids, self.head + np.flatnonzero(self.tail >= threshold)))
        return ids

    def kth_column_max(self, k: int) -> np.floating:
        """A threshold with at least ``k`` values at or above it (``k <= cols``)."""
        return np.partition(self.col_max, self.cols - k)[self.cols - k]

    def max(self) -> np.floating:
        top = self.col_max.max()
        return max(top, self.tail.max()) if self.tail.size else top


def _total(w: np.ndarray) -> np.floating:
    """``sum(w)`` by column sums: one vectorised pass, much faster than ``ndarray.sum`` here.

    Deterministic for given values, which is all the filters' definitions rely on.
    """
    if w.size <= _SMALL:
        return w.sum()
    cols = w.size // _ROWS
    head = cols * _ROWS
    total = w[:head].reshape(_ROWS, cols).sum(axis=0).sum()
    return total + w[head:].sum() if head < w.size else total


def _initial_support(x: np.ndarray) -> Support:
    """All ids whose logit is finite; ``None`` (no copy, no scan beyond a ``min``) when all are."""
    if x.min() > -np.inf:
        return None
    alive = np.flatnonzero(x > -np.inf)
    if alive.size == 0:
        raise ValueError("every logit is -inf or NaN: nothing to sample")
    return alive


def _values(x: np.ndarray, support: Support) -> np.ndarray:
    return x if support is None else x[support]


def _narrow(support: Support, keep: np.ndarray, size: int) -> Support:
    """Map positions ``keep`` within the support back to token ids (same object if nothing went)."""
    if keep.size == size:
        return support
    return keep if support is None else support[keep]


def _top_k_support(x: np.ndarray, support: Support, top_k: int) -> Support:
    """Keep the ``top_k`` largest logits, and every logit tied with the smallest of them."""
    vals = _values(x, support)
    n = vals.size
    if top_k <= 0 or top_k >= n:
        return support
    positions: np.ndarray | None = None
    if n > _SMALL and top_k <= n // _ROWS:
        # k columns have their maximum at or above the k-th largest column maximum, so the
        # entries at or above it are a superset of the top k: a few hundred, not the vocabulary.
        columns = _Columns(vals)
        positions = columns.at_least(columns.kth_column_max(top_k))
    cand = vals if positions is None else vals[positions]
    kth = np.partition(cand, cand.size - top_k)[cand.size - top_k]
    keep = np.flatnonzero(cand >= kth)
    if positions is not None:
        keep = positions[keep]
    return _narrow(support, keep, n)


def _top_p_support(x: np.ndarray, support: Support, top_p: float) -> Support:
    """Keep the smallest set of most probable tokens whose probability sums to ``top_p``.

    Definition (the full-sort one): with ``p = softmax`` over the support and ``q`` its values in
    descending order, let ``r`` be the first index with ``cumsum(q)[r] >= top_p`` (in the logits'
    float type); keep every token with ``p >= q[r]`` (ties at the edge stay); keep everything if
    rounding never lets the sum reach ``top_p``.

    The candidates ``{logit >= max + log(level)}`` hold exactly the largest values of ``q`` (up
    to ties, which the last step re-checks), so their sorted cumulative sum equals the first
    entries of the full one bit for bit: the vocabulary is never sorted unless the distribution
    is so flat that the nucleus needs it.
    """
    vals = _values(x, support)
    n = vals.size
    dtype = vals.dtype.type
    target = dtype(top_p)
    eps = float(np.finfo(vals.dtype).eps)
    if top_p >= 1.0 or n == 1:
        return support
    columns = _Columns(vals) if n > _SMALL else None
    top = vals.max() if columns is None else columns.max()
    e = vals - top
    np.exp(e, out=e)
    z = _total(e)
    positions: np.ndarray | None = None
    for level in _TOP_P_LEVELS if columns is not None else ():
        cand = columns.at_least(dtype(top + dtype(math.log(level))))
        probs = e[cand] / z
        # A recursive float sum of m terms errs by under m units of roundoff (relative), so a
        # candidate set this far short of top_p cannot reach it: skip the sort.
        if probs.sum(dtype=np.float64) * (1.0 + (cand.size + 2) * eps) < target:
            continue
        ordered = np.sort(probs)[::-1]
        cumulative = np.cumsum(ordered)
        if cumulative[-1] >= target:
            positions = cand
            break
    else:
        probs = e / z
        ordered = np.sort(probs)[::-1]
        cumulative = np.cumsum(ordered)
        if cumulative[-1] < target:
            return support
    cutoff = ordered[int(np.searchsorted(cumulative, target, side="left"))]
    if positions is None:
        keep = np.flatnonzero(probs >= cutoff)
    elif cutoff > ordered[-1]:
        keep = positions[probs >= cutoff]
    else:
        # The cutoff sits on the candidates' smallest value: equal values may lie outside.
        keep = np.flatnonzero(e / z >= cutoff)
    return _narrow(support, keep, n)


def _min_p_support(x: np.ndarray, support: Support, min_p: float) -> Support:
    """Keep tokens with ``p >= min_p * p_max``, i.e. ``logit >= max_logit + log(min_p)``."""
    if min_p <= 0.0:
        return support
    vals = _values(x, support)
    dtype = vals.dtype.type
    log_min_p = dtype(math.log(min_p))
    if vals.size <= _SMALL:
        keep = np.flatnonzero(vals >= dtype(vals.max() + log_min_p))
    else:
        columns = _Columns(vals)
        keep = columns.at_least(dtype(columns.max() + log_min_p))
    return _narrow(support, keep, vals.size)


# --------------------------------------------------------------------------------------------
# Public dense filters


def _as_logits(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits)
    if x.ndim != 1:
        raise ValueError(f"logits must be 1-D (vocab,), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    return x


def _apply_dense(logits: np.ndarray, select: SupportFilter) -> np.ndarray:
    x = _as_logits(logits)
    support = _initial_support(x)
    kept = select(x, support)
    if kept is support:
        return x
    out = np.full(x.shape, -np.inf, dtype=x.dtype)
    out[kept] = x[kept]
    return out


def apply_top_k(logits: np.ndarray, top_k: int) -> np.ndarray:
    """Set every logit below the ``top_k``-th largest to ``-inf`` (ties with it are kept).

    ``top_k <= 0`` or ``top_k >= vocab`` is a no-op. Never writes to ``logits``; returns it
    unchanged when nothing is filtered.
    """
    return _apply_dense(logits, lambda x, s: _top_k_support(x, s, top_k))


def apply_top_p(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus filter: keep the most probable tokens until their probability reaches ``top_p``.

    ``top_p >= 1`` is a no-op. Ties with the last kept token are kept. Never writes to
    ``logits``; returns it unchanged when nothing is filtered.
    """
    return _apply_dense(logits, lambda x, s: _top_p_support(x, s, top_p))


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``min_p`` times the most probable token's.

    Relative to the maximum, so the cut tightens when the model is confident. ``min_p <= 0`` is
    a no-op. Never writes to ``logits``; returns it unchanged when nothing is filtered.
    """
    return _apply_dense(logits, lambda x, s: _min_p_support(x, s, min_p))


# --------------------------------------------------------------------------------------------
# The draw


def _last_positive(w: np.ndarray) -> int:
    return int(np.flatnonzero(w > 0)[-1])


def _search(cumulative: np.ndarray, target: float, w: np.ndarray) -> int:
    """First ``i`` with ``cumulative[i] > target``: never a zero weight, clamped for rounding."""
    i = int(np.searchsorted(cumulative, target, side="right"))
    return i if i < w.size else _last_positive(w)


def _inverse_cdf(w: np.ndarray, u: float) -> int:
    """Sample an index with probability ``w[i] / sum(w)`` from the uniform ``u`` in [0, 1).

    Long arrays go through the column view (column sums, then one column of ``_ROWS``
    entries), so no vocabulary-long cumulative sum is needed; the order in which the CDF visits
    the entries does not matter for the distribution.
    """
    if w.size <= _SMALL:
        cumulative = np.cumsum(w, dtype=np.float64)
        return _search(cumulative, u * cumulative[-1], w)
    cols = w.size // _ROWS
    head = cols * _ROWS
    grid = w[:head].reshape(_ROWS, cols)
    sums = grid.sum(axis=0)
    if head < w.size:
        sums = np.append(sums, w[head:].sum())
    cumulative = np.cumsum(sums, dtype=np.float64)
    target = u * cumulative[-1]
    c = _search(cumulative, target, sums)
    block = w[head:] if c == cols else grid[:, c]
    inner = np.cumsum(block, dtype=np.float64)
    if c:
        inner += cumulative[c - 1]
    i = _search(inner, target, block)
    return head + i if c == cols else i * cols + c


def _draw(x: np.ndarray, support: Support, temperature: float, u: float) -> int:
    """Sample from ``softmax(logits / temperature)`` over the support with the uniform ``u``."""
    vals = _values(x, support)
    w = vals - vals.max()  # a fresh array: safe to work in place
    if temperature != 1.0:
        w *= w.dtype.type(1.0 / temperature)
    np.exp(w, out=w)
    i = _inverse_cdf(w, u)
    return i if support is None else int(support[i])


def greedy(logits: np.ndarray) -> int:
    """The most likely token (the first one on ties): temperature 0."""
    return int(np.argmax(logits))


def make_sampler(params: GenerationParams) -> Sampler:
    """Build the per-request sampler: ``(logits) -> token id``.

    Temperature 0 is :func:`greedy`. Otherwise the active filters run in the order top-k,
    top-p, min-p on the raw logits, then the draw samples ``softmax(logits / temperature)``
    over what survived, with a ``numpy`` generator seeded from ``params.seed``. The generator
    lives in the closure and advances once per token, so one seed reproduces a whole answer;
    build a new sampler per request.
    """
    if params.temperature == 0.0:
        return greedy
    filters: list[SupportFilter] = []
    if params.top_k > 0:
        filters.append(lambda x, s: _top_k_support(x, s, params.top_k))
    if params.top_p < 1.0:
        filters.append(lambda x, s: _top_p_support(x, s, params.top_p))
    if params.min_p > 0.0:
        filters.append(lambda x, s: _min_p_support(x, s, params.min_p))
    temperature = params.temperature
    rng = np.random.default_rng(params.seed)

    def sample(logits: np.ndarray) -> int:
        x = _as_logits(logits)
        support = _initial_support(x)
        for select in filters:
            support = select(x, support)
        return _draw(x, support, temperature, rng.random())

    return sample
