"""Logits processors named after the OpenAI / Hugging Face penalties, and the token history they read.

Each processor is ``(tokens, logits) -> logits``. ``TokenHistory`` is built once from the prompt
and appended to per generated token, so a penalty costs O(distinct ids) per step rather than a
recount of the whole history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from npu.llm.params import GenerationParams


class _Column:
    """A numpy array that grows by doubling, so appends are O(1) amortised."""

    __slots__ = ("_data", "_size")

    def __init__(self, dtype: type[np.generic], initial: np.ndarray | None = None) -> None:
        init = np.zeros(0, dtype) if initial is None else np.asarray(initial, dtype)
        self._data = np.empty(max(64, 2 * init.size), dtype)
        self._data[: init.size] = init
        self._size = init.size

    def append(self, value: float) -> int:
        if self._size == self._data.size:
            grown = np.empty(2 * self._data.size, self._data.dtype)
            grown[: self._size] = self._data
            self._data = grown
        self._data[self._size] = value
        self._size += 1
        return self._size - 1

    def increment(self, index: int) -> None:
        self._data[index] += 1

    def view(self) -> np.ndarray:
        out = self._data[: self._size]
        out.flags.writeable = False
        return out


class TokenHistory:
    """The tokens one request has seen: distinct ids overall, and counts in the completion.

    ``repetition_penalty`` (Hugging Face) looks at every previous token, prompt included; the
    OpenAI ``presence_penalty`` / ``frequency_penalty`` look at the generated ones only. Built
    once from the prompt, then :meth:`append` per generated token costs O(1) amortised, so a
    penalty costs O(distinct ids) per step instead of re-counting the whole history.
    """

    __slots__ = ("_all", "_gen_counts", "_gen_ids", "_gen_index", "_seen", "generated_len", "prompt_len")

    def __init__(self, prompt: Sequence[int] | np.ndarray = ()) -> None:
        ids = np.unique(np.asarray(prompt, dtype=np.int64).reshape(-1))
        if ids.size and ids[0] < 0:
            raise ValueError("token ids must be non-negative")
        self.prompt_len = int(np.asarray(prompt).size)
        self.generated_len = 0
        self._seen: set[int] = set(ids.tolist())
        self._all = _Column(np.int64, ids)
        self._gen_index: dict[int, int] = {}
        self._gen_ids = _Column(np.int64)
        self._gen_counts = _Column(np.float32)

    def append(self, token: int) -> None:
        """Record one generated token."""
        token = int(token)
        if token < 0:
            raise ValueError("token ids must be non-negative")
        self.generated_len += 1
        if token not in self._seen:
            self._seen.add(token)
            self._all.append(token)
        index = self._gen_index.get(token)
        if index is None:
            self._gen_index[token] = self._gen_ids.append(token)
            self._gen_counts.append(1)
        else:
            self._gen_counts.increment(index)

    def extend(self, tokens: Iterable[int]) -> None:
        """Record several generated tokens, in order."""
        for token in tokens:
            self.append(token)

    def __len__(self) -> int:
        return self.prompt_len + self.generated_len

    @property
    def all_ids(self) -> np.ndarray:
        """Distinct ids of the prompt and the completion (read-only view)."""
        return self._all.view()

    @property
    def generated_ids(self) -> np.ndarray:
        """Distinct ids of the completion, in order of first appearance (read-only view)."""
        return self._gen_ids.view()

    @property
    def generated_counts(self) -> np.ndarray:
        """How often each of :attr:`generated_ids` was generated, as float32 (read-only view)."""
        return self._gen_counts.view()


TokensLike = TokenHistory | Sequence[int] | np.ndarray
LogitsProcessor = Callable[[TokensLike, np.ndarray], np.ndarray]


def _as_history(tokens: TokensLike) -> TokenHistory:
    """Accept a bare token list for convenience: every token then counts as generated (O(n))."""
    if isinstance(tokens, TokenHistory):
        return tokens
    history = TokenHistory()
    history.extend(np.asarray(tokens, dtype=np.int64).reshape(-1).tolist())
    return history


def make_repetition_penalty(penalty: float, *, inplace: bool = False) -> LogitsProcessor:
    """Hugging Face ``repetition_penalty``: for every id seen so far (prompt and completion),
    divide a positive logit by ``penalty`` and multiply a negative one (CTRL, arXiv:1909.05858).
    """
    if penalty <= 0.0:
        raise ValueError("repetition_penalty must be positive")

    def repetition_penalty(tokens: TokensLike, logits: np.ndarray) -> np.ndarray:
        ids = _as_history(tokens).all_ids
        if ids.size == 0:
            return logits
        out = logits if inplace else logits.copy()
        picked = out[ids]
        out[ids] = np.where(picked < 0, picked * penalty, picked / penalty)
        return out

    return repetition_penalty


def make_presence_penalty(penalty: float, *, inplace: bool = False) -> LogitsProcessor:
    """OpenAI ``presence_penalty``: subtract ``penalty`` once from every generated id's logit."""

    def presence_penalty(tokens: TokensLike, logits: np.ndarray) -> np.ndarray:
        ids = _as_history(tokens).generated_ids
        if ids.size == 0:
            return logits
        out = logits if inplace else logits.copy()
        out[ids] -= penalty
        return out

    return presence_penalty


def make_frequency_penalty(penalty: float, *, inplace: bool = False) -> LogitsProcessor:
    """OpenAI ``frequency_penalty``: subtract ``penalty`` times each id's count in the completion."""

    def frequency_penalty(tokens: TokensLike, logits: np.ndarray) -> np.ndarray:
        history = _as_history(tokens)
        ids = history.generated_ids
        if ids.size == 0:
            return logits
        out = logits if inplace else logits.copy()
        out[ids] -= (penalty * history.generated_counts).astype(out.dtype, copy=False)
        return out

    return frequency_penalty


def make_logit_bias(bias: Sequence[tuple[int, float]], *, inplace: bool = False) -> LogitsProcessor:
    """OpenAI ``logit_bias``: add each token's bias to its logit (-100 bans it, 100 all but forces it)."""
    ids = np.array([t for t, _ in bias], dtype=np.int64)
    values = np.array([b for _, b in bias], dtype=np.float32)

    def logit_bias(tokens: TokensLike, logits: np.ndarray) -> np.ndarray:
        out = logits if inplace else logits.copy()
        np.add.at(out, ids, values.astype(out.dtype, copy=False))
        return out

    return logit_bias


def make_logits_processors(params: GenerationParams, *, inplace: bool = False) -> list[LogitsProcessor]:
    """The active penalties of ``params`` as ``(tokens, logits) -> logits`` processors.

    Pass a :class:`TokenHistory` as ``tokens`` (built from the prompt, appended to per
    generated token) so each penalty sees the part of the history it is defined on; a bare
    sequence is accepted and counted as all generated. Processors return a new array unless
    ``inplace`` is set, in which case they write into ``logits`` (useful when the caller owns a
    fresh logits buffer per step and wants to save the copies). Order: repetition, presence,
    frequency, then ``logit_bias``.
    """
    processors: list[LogitsProcessor] = []
    if params.repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(params.repetition_penalty, inplace=inplace))
    if params.presence_penalty != 0.0:
        processors.append(make_presence_penalty(params.presence_penalty, inplace=inplace))
    if params.frequency_penalty != 0.0:
        processors.append(make_frequency_penalty(params.frequency_penalty, inplace=inplace))
    if params.logit_bias:
        processors.append(make_logit_bias(params.logit_bias, inplace=inplace))
    return processors


