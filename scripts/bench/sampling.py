"""Microseconds per token of the samplers and penalties (run: ./scripts/bench_sampling)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from npu.llm.logits_processors import TokenHistory, make_logits_processors
from npu.llm.params import GenerationParams
from npu.llm.sampling import make_sampler


def _synthetic_logits(rng: np.random.Generator, vocab: int, peaked: bool) -> np.ndarray:
    """A Gaussian bulk (std 2) and, when ``peaked``, 64 preferred tokens on a Zipf-like slope.

    Peaked resembles a typical decode step (the 0.9 nucleus holds a few dozen tokens); the
    bulk alone is the worst case for top-p, whose nucleus then spans most of the vocabulary.
    """
    x = rng.standard_normal(vocab).astype(np.float32) * 2.0
    if peaked:
        top = rng.choice(vocab, 64, replace=False)
        x[top] = (20.0 - 1.5 * np.log1p(np.arange(64))).astype(np.float32)
    return x


def _median_us(call: Callable[[int], object], repeats: int, rounds: int = 7) -> float:
    """Median over ``rounds`` of the mean time per call: robust to a noisy machine."""
    per_round = max(1, repeats // rounds)
    means = []
    for r in range(rounds):
        start = time.perf_counter()
        for i in range(per_round):
            call(r * per_round + i)
        means.append((time.perf_counter() - start) / per_round * 1e6)
    return float(np.median(means))


def _penalty_us(rng: np.random.Generator, logits: np.ndarray, repeats: int) -> float:
    vocab = logits.size
    history = TokenHistory(rng.integers(0, vocab, 1000))
    history.extend(rng.integers(0, vocab, 200).tolist())
    processors = make_logits_processors(
        GenerationParams(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
        inplace=True,
    )
    logits = logits.copy()

    def penalise(i: int) -> None:
        for process in processors:
            process(history, logits)
        history.append(i % vocab)

    return _median_us(penalise, repeats)


def benchmark(vocabs: Sequence[int] = (49152, 151936), repeats: int = 350) -> list[tuple[str, int, float]]:
    """Microseconds per token of the samplers and penalties; returns (case, vocab, us) rows."""
    cases: dict[str, GenerationParams] = {
        "greedy": GenerationParams(temperature=0.0),
        "temperature only": GenerationParams(temperature=0.7, seed=0),
        "top_k=50": GenerationParams(temperature=0.7, top_k=50, seed=0),
        "top_p=0.9": GenerationParams(temperature=0.7, top_p=0.9, seed=0),
        "min_p=0.05": GenerationParams(temperature=0.7, min_p=0.05, seed=0),
        "top_k=50 top_p=0.9 min_p=0.05": GenerationParams(
            temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, seed=0
        ),
    }
    rng = np.random.default_rng(0)
    rows: list[tuple[str, int, float]] = []
    for vocab in vocabs:
        for peaked in (True, False):
            shape = "peaked" if peaked else "flat, worst case"
            batch = [_synthetic_logits(rng, vocab, peaked) for _ in range(8)]
            for name, params in cases.items():
                sampler = make_sampler(params)
                us = _median_us(lambda i, sampler=sampler, batch=batch: sampler(batch[i % 8]), repeats)
                rows.append((f"{name} ({shape})", vocab, us))
        rows.append(("3 penalties, 1000+200 history, in place", vocab, _penalty_us(rng, batch[0], repeats)))
    return rows


def main() -> None:
    for name, vocab, us in benchmark():
        print(f"{name:50s} vocab {vocab:6d}: {us:8.1f} us/token")


if __name__ == "__main__":
    main()
