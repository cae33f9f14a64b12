"""Log-probabilities of generated tokens (OpenAI ``logprobs`` / ``top_logprobs``), on the host.

Computed from the logits the sampler drew from, before temperature (as vLLM reports them by
default): after the penalties, ``logit_bias`` and the grammar mask, so a token the grammar forbids
never shows up among the most likely. Costs one pass over the vocabulary for the normaliser and
one partition for the top ``n``; nothing is computed unless a request asks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from npu.llm.params import TokenLogprob

Describe = Callable[[int], tuple[str, bytes]]  # token id -> (text, exact bytes)


def token_logprob(logits: np.ndarray, token: int, top: int, describe: Describe) -> TokenLogprob:
    """``token``'s log-probability under ``softmax(logits)`` and the ``top`` most likely tokens."""
    x = np.asarray(logits, dtype=np.float32)
    peak = x.max()
    shifted = x - peak
    np.exp(shifted, out=shifted)
    log_norm = float(peak) + float(np.log(shifted.sum(dtype=np.float64)))
    best: tuple[tuple[int, str, bytes, float], ...] = ()
    if top > 0:
        k = min(top, x.size)
        ids = np.argpartition(x, x.size - k)[x.size - k :]
        ids = ids[np.lexsort((ids, -x[ids]))]  # most likely first, ties by id
        best = tuple((int(i), *describe(int(i)), float(x[i]) - log_norm) for i in ids if np.isfinite(x[i]))
    text, raw = describe(token)
    return TokenLogprob(int(token), text, raw, float(x[token]) - log_norm, best)
