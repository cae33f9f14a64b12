"""KV cache bookkeeping: prefix reuse rules, the decode mask invariant, the cache pool."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from npu.llm.kv_cache import (
    MASKED,
    CachePool,
    LayerKVCache,
    SequenceCache,
    common_prefix_length,
    reusable_prefix,
)


def make_cache(capacity: int = 16, layers: int = 2, kv_dim: int = 4) -> SequenceCache:
    return SequenceCache([LayerKVCache(capacity, kv_dim, np.dtype(np.float32)) for _ in range(layers)],
                         np.dtype(np.float32))


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([], [1, 2], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2, 4], 2),
        ([5], [1], 0),
        ([1, 2], [1, 2, 3], 2),
    ],
)
def test_common_prefix_length(a: list[int], b: list[int], expected: int) -> None:
    assert common_prefix_length(a, b) == expected


def test_reusable_prefix_is_whole_chunks_and_leaves_the_last_prompt_token() -> None:
    history = list(range(300))
    assert reusable_prefix(history, [*history, 7, 8], 128) == 256
    assert reusable_prefix(history, history[:256], 128) == 128  # the last token is recomputed
    assert reusable_prefix(history, history[:129], 128) == 128
    assert reusable_prefix(history, history[:100] + [-1] * 200, 128) == 0
    assert reusable_prefix([], history, 128) == 0


def test_decode_mask_follows_the_stored_rows() -> None:
    cache = make_cache(capacity=8)
    assert cache.decode_mask.shape == (1, 1, 9)
    assert cache.decode_mask[0, 0, 8] == 0, "the current token always attends to itself"
    assert (cache.decode_mask[0, 0, :8] == MASKED).all()
    cache.commit(0, [10, 11, 12])
    assert (cache.decode_mask[0, 0, :3] == 0).all() and (cache.decode_mask[0, 0, 3:8] == MASKED).all()
    cache.trim(1)
    assert cache.tokens == [10]
    assert cache.decode_mask[0, 0, 0] == 0 and (cache.decode_mask[0, 0, 1:8] == MASKED).all()
    with pytest.raises(ValueError, match="appended at 1"):
        cache.commit(3, [1])
    cache.commit(1, list(range(7)))
    assert cache.free == 0
    with pytest.raises(ValueError, match="full"):
        cache.commit(8, [1])


def test_layer_cache_writes_rows_in_place() -> None:
    layer = LayerKVCache(6, 2, np.dtype(np.float32))
    layer.write(2, np.ones((1, 2, 2)), np.full((1, 2, 2), 2.0))
    k, v = layer.history(4)
    assert k.shape == (1, 4, 2) and k[0, 2:].tolist() == [[1, 1], [1, 1]] and v[0, :2].sum() == 0
    assert layer.full()[0].shape == (1, 6, 2)
    assert layer.nbytes == 2 * 6 * 2 * 4


def test_pool_prefers_the_longest_shared_prefix_then_least_recent() -> None:
    pool = CachePool(3, make_cache)
    a, b, c = (pool.acquire([]) for _ in range(3))
    a.commit(0, [1, 2, 3])
    b.commit(0, [1, 2, 9])
    c.commit(0, [7])
    assert pool.try_acquire([1]) is None, "all three slots are busy"
    for cache in (a, b, c):
        pool.release(cache)
    assert pool.acquire([1, 2, 9, 4]) is b
    assert pool.acquire([5, 5]) is a, "no shared prefix: the least recently released"
    assert pool.acquire([7, 7]) is c


def test_pool_acquire_waits_for_a_release_and_times_out() -> None:
    pool = CachePool(1, make_cache)
    held = pool.acquire([1])
    with pytest.raises(TimeoutError):
        pool.acquire([1], timeout=0.05)
    threading.Timer(0.05, pool.release, args=(held,)).start()
    assert pool.acquire([1], timeout=5) is held
