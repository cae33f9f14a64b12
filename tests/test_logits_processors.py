"""Penalties named after the OpenAI / Hugging Face parameters, and the token history they read."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from npu.llm.logits_processors import (
    TokenHistory,
    make_frequency_penalty,
    make_logits_processors,
    make_presence_penalty,
    make_repetition_penalty,
)
from npu.llm.params import GenerationParams


def f32(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def test_token_history_counts_incrementally() -> None:
    history = TokenHistory([5, 3, 5, 9])
    assert len(history) == 4 and history.prompt_len == 4 and history.generated_len == 0
    assert sorted(history.all_ids.tolist()) == [3, 5, 9]
    assert history.generated_ids.size == 0
    history.extend([7, 3, 7, 7])
    assert len(history) == 8
    assert sorted(history.all_ids.tolist()) == [3, 5, 7, 9]
    assert history.generated_ids.tolist() == [7, 3]
    assert history.generated_counts.tolist() == [3.0, 1.0]
    with pytest.raises(ValueError):
        history.generated_ids[0] = 1  # read-only view


def test_token_history_grows_past_its_initial_capacity() -> None:
    history = TokenHistory()
    for i in range(1000):
        history.append(i % 300)
    assert sorted(history.generated_ids.tolist()) == list(range(300))
    counts = dict(zip(history.generated_ids.tolist(), history.generated_counts.tolist(), strict=True))
    assert counts[0] == 4 and counts[299] == 3


def test_repetition_penalty_hf_semantics_over_prompt_and_completion() -> None:
    logits = f32([2.0, -2.0, 4.0, -4.0, 1.0])
    history = TokenHistory([0, 1])
    history.append(2)
    out = make_repetition_penalty(2.0)(history, logits)
    np.testing.assert_allclose(out, [1.0, -4.0, 2.0, -4.0, 1.0])
    np.testing.assert_array_equal(logits, f32([2.0, -2.0, 4.0, -4.0, 1.0]))  # not mutated


def test_presence_and_frequency_penalties_use_generated_tokens_only() -> None:
    logits = f32([1.0, 1.0, 1.0, 1.0])
    history = TokenHistory([0, 0, 0])
    history.extend([1, 2, 2, 2])
    presence = make_presence_penalty(0.5)(history, logits)
    np.testing.assert_allclose(presence, [1.0, 0.5, 0.5, 1.0])
    frequency = make_frequency_penalty(0.5)(history, logits)
    np.testing.assert_allclose(frequency, [1.0, 0.5, -0.5, 1.0])
    np.testing.assert_array_equal(logits, f32([1.0, 1.0, 1.0, 1.0]))


def test_processors_in_place_write_into_the_array() -> None:
    logits = f32([1.0, 1.0])
    history = TokenHistory([0])
    history.append(1)
    for process in make_logits_processors(
        GenerationParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0), inplace=True
    ):
        assert process(history, logits) is logits
    np.testing.assert_allclose(logits, [0.5, -1.5])


def test_processors_accept_a_plain_token_list_as_generated() -> None:
    logits = f32([1.0, 1.0, 1.0])
    out = make_frequency_penalty(1.0)([2, 2, 0], logits)
    np.testing.assert_allclose(out, [0.0, 1.0, -1.0])
    out = make_repetition_penalty(2.0)(np.array([1]), logits)
    np.testing.assert_allclose(out, [1.0, 0.5, 1.0])


def test_make_logits_processors_only_active_ones_in_order() -> None:
    assert make_logits_processors(GenerationParams()) == []
    names = [
        p.__name__
        for p in make_logits_processors(
            GenerationParams(repetition_penalty=1.2, presence_penalty=0.1, frequency_penalty=-0.3)
        )
    ]
    assert names == ["repetition_penalty", "presence_penalty", "frequency_penalty"]
    with pytest.raises(ValueError):
        make_repetition_penalty(0.0)


def naive_penalties(
    prompt: list[int], generated: list[int], logits: np.ndarray, rep: float, pres: float, freq: float
) -> np.ndarray:
    out = logits.astype(np.float32).copy()
    for t in set(prompt) | set(generated):
        out[t] = out[t] * rep if out[t] < 0 else out[t] / rep
    for t, c in Counter(generated).items():
        out[t] -= np.float32(pres)
        out[t] -= np.float32(freq * c)
    return out


@given(
    st.lists(st.integers(0, 19), max_size=40),
    st.lists(st.integers(0, 19), max_size=40),
    st.lists(st.floats(-10, 10, width=32), min_size=20, max_size=20),
    st.floats(0.5, 2.0),
    st.floats(-2.0, 2.0),
    st.floats(-2.0, 2.0),
)
def test_penalties_match_a_naive_recount(
    prompt: list[int], generated: list[int], values: list[float], rep: float, pres: float, freq: float
) -> None:
    logits = f32(values)
    history = TokenHistory(prompt)
    for token in generated:
        history.append(token)
    out = logits
    for process in make_logits_processors(
        GenerationParams(repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq)
    ):
        out = process(history, out)
    np.testing.assert_allclose(out, naive_penalties(prompt, generated, logits, rep, pres, freq), atol=1e-5)
