"""What a caller asks of one generation, and what each step of it reports back.

These are the engine-side shapes; the MQTT handlers and the HTTP bridge validate their own
protocol payloads with pydantic and build a ``GenerationParams`` from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping controls, named after the OpenAI parameters.

    ``temperature == 0`` is greedy decoding. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0``
    disable their filters; penalties of 0 (or 1 for ``repetition_penalty``) disable theirs.
    ``seed`` makes a sampled answer reproducible; ``None`` draws from fresh entropy.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_tokens < 1:
            problems.append("max_tokens must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            problems.append("temperature must be between 0 and 2")
        if not 0.0 < self.top_p <= 1.0:
            problems.append("top_p must be in (0, 1]")
        if self.top_k < 0:
            problems.append("top_k must be 0 (off) or positive")
        if not 0.0 <= self.min_p < 1.0:
            problems.append("min_p must be in [0, 1)")
        if self.repetition_penalty <= 0.0:
            problems.append("repetition_penalty must be positive")
        if not -2.0 <= self.presence_penalty <= 2.0:
            problems.append("presence_penalty must be between -2 and 2")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            problems.append("frequency_penalty must be between -2 and 2")
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerationResponse:
    """One item of ``stream_generate``: a text delta, and on the last item the finish reason.

    ``text`` is safe to show as is: it never ends inside a UTF-8 character and never contains
    a prefix of a stop string that may still complete.
    """

    text: str
    token: int | None
    finish_reason: FinishReason | None = None
    usage: Usage = field(default_factory=Usage)
    prompt_ms: float = 0.0
    generation_ms: float = 0.0
    prompt_done: int = 0  # prompt tokens processed so far (progress items during prefill)

    @property
    def generation_tps(self) -> float:
        n = self.usage.completion_tokens
        return n / (self.generation_ms / 1000.0) if self.generation_ms > 0 else 0.0
