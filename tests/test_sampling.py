"""Filters, draw and penalties of npu.llm.sampling, against straightforward references."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npu.llm import sampling
from npu.llm.logits_processors import TokenHistory, make_repetition_penalty
from npu.llm.params import GenerationParams
from npu.llm.sampling import apply_min_p, apply_top_k, apply_top_p, make_sampler

NEG_INF = -np.inf


def f32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def kept(logits: np.ndarray) -> list[int]:
    return np.flatnonzero(logits > NEG_INF).tolist()


@contextmanager
def tiny_index() -> Iterator[None]:
    """Shrink the size thresholds so small arrays go through the column-index code paths."""
    with mock.patch.object(sampling, "_SMALL", 8), mock.patch.object(sampling, "_ROWS", 4):
        yield


# ---------------------------------------------------------------------------------------------
# References: the textbook full-sort definitions


def ref_top_k(x: np.ndarray, k: int) -> np.ndarray:
    alive = np.flatnonzero(x > NEG_INF)
    if k <= 0 or k >= alive.size:
        return x
    kth = np.sort(x[alive])[-k]
    return np.where(x >= kth, x, NEG_INF).astype(x.dtype)


def ref_top_p(x: np.ndarray, top_p: float) -> np.ndarray:
    alive = np.flatnonzero(x > NEG_INF)
    vals = x[alive]
    if top_p >= 1.0 or vals.size == 1:
        return x
    e = vals - vals.max()
    np.exp(e, out=e)
    probs = e / sampling._total(e)  # the softmax normaliser is part of the definition
    ordered = np.sort(probs)[::-1]
    cumulative = np.cumsum(ordered)
    reached = np.flatnonzero(cumulative >= np.float32(top_p))
    if reached.size == 0:
        return x
    keep = alive[probs >= ordered[reached[0]]]
    out = np.full_like(x, NEG_INF)
    out[keep] = x[keep]
    return out


def ref_min_p(x: np.ndarray, min_p: float) -> np.ndarray:
    if min_p <= 0:
        return x
    alive = x[x > NEG_INF]
    cutoff = np.float32(alive.max() + np.float32(math.log(min_p)))
    return np.where(x >= cutoff, x, NEG_INF).astype(x.dtype)


# Logits built from a few repeated values, so ties (also exactly at the edges) are common.
tie_prone = st.lists(
    st.sampled_from([0.0, 0.0, -0.5, -1.0, -2.0, -4.6, -4.6052, -9.2, -16.2, 3.0, 3.0, 8.0, NEG_INF]),
    min_size=1,
    max_size=120,
).filter(lambda v: any(a > NEG_INF for a in v))
generic = st.lists(st.floats(-30.0, 30.0, allow_nan=False, width=32), min_size=1, max_size=120)
logits_lists = st.one_of(tie_prone, generic)


@st.composite
def large_logits(draw: st.DrawFn) -> np.ndarray:
    """Vocabulary-sized logits (> _SMALL) from a seed: peaked, flat or tied."""
    seed = draw(st.integers(0, 2**32 - 1))
    vocab = draw(st.integers(4097, 30000))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(vocab).astype(np.float32) * np.float32(draw(st.sampled_from([0.5, 2.0, 4.0])))
    boosted = draw(st.integers(0, 200))
    if boosted:
        x[rng.choice(vocab, boosted, replace=False)] = np.float32(draw(st.floats(2.0, 25.0)))
    if draw(st.booleans()):
        x = np.round(x).astype(np.float32)  # many exact ties
    if draw(st.booleans()):
        x[rng.choice(vocab, 10, replace=False)] = NEG_INF
    return x


# ---------------------------------------------------------------------------------------------
# Filters on tiny arrays


def test_top_k_keeps_largest() -> None:
    assert kept(apply_top_k(f32([1, 3, 2, 5, 4]), 2)) == [3, 4]
    assert kept(apply_top_k(f32([1, 3, 2, 5, 4]), 1)) == [3]


def test_top_k_keeps_ties_with_kth() -> None:
    assert kept(apply_top_k(f32([1, 2, 2, 0]), 2)) == [1, 2]
    assert kept(apply_top_k(f32([1, 2, 2, 0]), 1)) == [1, 2]


def test_top_k_off_or_larger_than_vocab_is_noop() -> None:
    x = f32([1, 2, 3])
    assert apply_top_k(x, 0) is x
    assert apply_top_k(x, 3) is x
    assert apply_top_k(x, 1000) is x


def test_top_p_smallest_prefix_reaching_mass() -> None:
    x = np.log(f32([0.5, 0.3, 0.15, 0.05]))
    assert kept(apply_top_p(x, 0.4)) == [0]
    assert kept(apply_top_p(x, 0.7)) == [0, 1]
    assert kept(apply_top_p(x, 0.9)) == [0, 1, 2]
    assert kept(apply_top_p(x, 0.99)) == [0, 1, 2, 3]


def test_top_p_one_is_off_and_tiny_keeps_the_max() -> None:
    x = f32([0.1, 2.0, -1.0])
    assert apply_top_p(x, 1.0) is x
    assert kept(apply_top_p(x, 1e-9)) == [1]


def test_top_p_keeps_ties_at_the_edge() -> None:
    x = np.log(f32([0.4, 0.3, 0.3]))
    assert kept(apply_top_p(x, 0.5)) == [0, 1, 2]


def test_min_p_is_relative_to_the_max_probability() -> None:
    x = np.log(f32([0.5, 0.3, 0.1, 0.04, 0.06]))
    # kept: p >= 0.1 * 0.5 = 0.05
    assert kept(apply_min_p(x, 0.1)) == [0, 1, 2, 4]
    # shifting every logit changes no probability ratio
    assert kept(apply_min_p(x + np.float32(7.0), 0.1)) == [0, 1, 2, 4]
    assert apply_min_p(x, 0.0) is x


def test_filters_do_not_mutate_their_input() -> None:
    x = f32([3, 1, 2, 0, -1])
    before = x.copy()
    apply_top_k(x, 2)
    apply_top_p(x, 0.5)
    apply_min_p(x, 0.5)
    np.testing.assert_array_equal(x, before)


def test_filters_respect_existing_minus_inf() -> None:
    x = f32([NEG_INF, 1, NEG_INF, 0.5])
    assert kept(apply_top_k(x, 5)) == [1, 3]
    assert kept(apply_top_k(x, 1)) == [1]
    assert kept(apply_top_p(x, 0.99)) == [1, 3]


def test_all_minus_inf_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to sample"):
        apply_top_p(f32([NEG_INF, NEG_INF]), 0.5)
    with pytest.raises(ValueError, match="nothing to sample"):
        make_sampler(GenerationParams(seed=1))(f32([NEG_INF]))


def test_filters_reject_2d_logits() -> None:
    with pytest.raises(ValueError, match="1-D"):
        apply_top_k(np.zeros((1, 4), np.float32), 2)


# ---------------------------------------------------------------------------------------------
# Fast filters == full-sort references


@given(logits_lists, st.integers(0, 130))
def test_top_k_matches_reference(values: list[float], k: int) -> None:
    x = f32(values)
    np.testing.assert_array_equal(apply_top_k(x, k), ref_top_k(x, k))
    with tiny_index():
        np.testing.assert_array_equal(apply_top_k(x, k), ref_top_k(x, k))


@given(logits_lists, st.floats(1e-6, 1.0))
def test_top_p_matches_full_sort_reference(values: list[float], top_p: float) -> None:
    x = f32(values)
    np.testing.assert_array_equal(apply_top_p(x, top_p), ref_top_p(x, top_p))
    with tiny_index():
        np.testing.assert_array_equal(apply_top_p(x, top_p), ref_top_p(x, top_p))


@given(logits_lists, st.floats(0.0, 0.999))
def test_min_p_matches_reference(values: list[float], min_p: float) -> None:
    x = f32(values)
    np.testing.assert_array_equal(apply_min_p(x, min_p), ref_min_p(x, min_p))
    with tiny_index():
        np.testing.assert_array_equal(apply_min_p(x, min_p), ref_min_p(x, min_p))


@settings(max_examples=40, deadline=None)
@given(large_logits(), st.floats(0.05, 0.999), st.integers(1, 300), st.floats(0.0, 0.5))
def test_filters_match_references_on_vocabulary_sized_logits(
    x: np.ndarray, top_p: float, k: int, min_p: float
) -> None:
    np.testing.assert_array_equal(apply_top_p(x, top_p), ref_top_p(x, top_p))
    np.testing.assert_array_equal(apply_top_k(x, k), ref_top_k(x, k))
    np.testing.assert_array_equal(apply_min_p(x, min_p), ref_min_p(x, min_p))


# ---------------------------------------------------------------------------------------------
# The sampler


def test_greedy_is_argmax_first_on_ties() -> None:
    sampler = make_sampler(GenerationParams(temperature=0.0, top_k=1, top_p=0.1))
    assert sampler(f32([0.0, 3.0, 3.0, 1.0])) == 1
    assert isinstance(sampler(f32([0.0, 3.0])), int)


@settings(max_examples=60, deadline=None)
@given(
    st.one_of(logits_lists.map(f32), large_logits()),
    st.integers(0, 60),
    st.floats(0.01, 1.0),
    st.floats(0.0, 0.9),
    st.floats(0.05, 2.0),
    st.integers(0, 2**32 - 1),
)
def test_sampler_is_the_filter_chain_then_the_draw(
    x: np.ndarray, top_k: int, top_p: float, min_p: float, temperature: float, seed: int
) -> None:
    params = GenerationParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    before = x.copy()
    token = make_sampler(params)(x)
    np.testing.assert_array_equal(x, before)  # not mutated

    dense = apply_min_p(apply_top_p(apply_top_k(x, top_k), top_p), min_p)
    survivors = kept(dense)
    assert survivors  # the filters always leave a token
    assert token in survivors
    u = np.random.default_rng(seed).random()
    assert token == sampling._draw(dense, sampling._initial_support(dense), temperature, u)


def test_seed_reproduces_the_whole_answer() -> None:
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal(500).astype(np.float32) for _ in range(30)]
    params = GenerationParams(temperature=1.0, top_p=0.95, seed=1234)

    def run(params: GenerationParams) -> list[int]:
        sampler = make_sampler(params)
        return [sampler(x) for x in steps]

    assert run(params) == run(params)
    assert run(GenerationParams(temperature=1.0, top_p=0.95, seed=99)) != run(params)
    # the generator advances: identical logits at every step still give varied tokens
    sampler = make_sampler(params)
    assert len({sampler(steps[0]) for _ in range(30)}) > 1


def test_unseeded_sampler_works() -> None:
    token = make_sampler(GenerationParams(temperature=0.7))(f32([0.0, 1.0, 2.0]))
    assert token in (0, 1, 2)


def test_draw_frequencies_follow_softmax_with_temperature() -> None:
    x = f32([0.0, 1.0, 2.0, -1.0])
    temperature = 0.7
    sampler = make_sampler(GenerationParams(temperature=temperature, seed=5))
    n = 20000
    counts = Counter(sampler(x) for _ in range(n))
    p = np.exp(x / temperature)
    p /= p.sum()
    for i, pi in enumerate(p):
        sigma = math.sqrt(n * pi * (1 - pi))
        assert abs(counts[i] - n * pi) < 5 * sigma + 1


@pytest.mark.parametrize("size", [100, 5000, 4096 * 3 + 17])
def test_inverse_cdf_is_exact_on_a_grid(size: int) -> None:
    """Evenly spaced u hit each index in proportion to its weight (+-1), zeros never."""
    rng = np.random.default_rng(size)
    w = np.zeros(size, np.float32)
    heavy = rng.choice(size, 12, replace=False)
    w[heavy] = rng.random(12).astype(np.float32) + np.float32(0.1)
    light = rng.choice(size, 40, replace=False)
    w[light] += np.float32(1e-3)
    grid = 4000
    counts = Counter(sampling._inverse_cdf(w, (j + 0.5) / grid) for j in range(grid))
    total = float(w.astype(np.float64).sum())
    assert set(counts) <= set(np.flatnonzero(w).tolist())
    for i in np.flatnonzero(w):
        assert abs(counts[int(i)] - grid * float(w[i]) / total) <= 1.01


def test_inverse_cdf_extremes_of_u() -> None:
    w = f32([0.0, 1.0, 0.0, 2.0, 0.0])
    assert sampling._inverse_cdf(w, 0.0) == 1
    assert sampling._inverse_cdf(w, np.nextafter(1.0, 0.0)) == 3


# ---------------------------------------------------------------------------------------------
# Token history and processors


# ---------------------------------------------------------------------------------------------
# Parity with transformers' logits warpers (same tokens kept on generic logits)


@pytest.mark.reference
@pytest.mark.parametrize("seed", range(12))
def test_filters_and_repetition_penalty_match_transformers(seed: int) -> None:
    import torch
    from transformers.generation import logits_process
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(50, 6000))
    x = (rng.standard_normal(vocab) * rng.uniform(0.5, 4.0)).astype(np.float32)
    scores = torch.from_numpy(x.copy())[None, :]
    ids = torch.zeros((1, 1), dtype=torch.long)

    def hf(warper: object) -> np.ndarray:
        return warper(ids, scores.clone())[0].numpy()  # type: ignore[operator]

    top_k = int(rng.integers(1, 80))
    top_p = float(rng.uniform(0.1, 0.99))
    min_p = float(rng.uniform(0.01, 0.5))
    assert kept(apply_top_k(x, top_k)) == kept(hf(logits_process.TopKLogitsWarper(top_k)))
    assert kept(apply_top_p(x, top_p)) == kept(hf(logits_process.TopPLogitsWarper(top_p)))
    assert kept(apply_min_p(x, min_p)) == kept(hf(logits_process.MinPLogitsWarper(min_p)))

    history = rng.integers(0, vocab, 40)
    expected = logits_process.RepetitionPenaltyLogitsProcessor(1.3)(
        torch.from_numpy(history)[None, :], scores.clone()
    )[0].numpy()
    np.testing.assert_allclose(make_repetition_penalty(1.3)(TokenHistory(history), x), expected, rtol=1e-6)
