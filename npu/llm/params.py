"""What a caller asks of one generation, and what each step of it reports back.

These are the engine-side shapes; the MQTT handlers and the HTTP bridge validate their own
protocol payloads with pydantic and build a ``GenerationParams`` from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from npu.bounds import Bound

if TYPE_CHECKING:
    from npu.llm.constraints import Constraint

FinishReason = Literal["stop", "length"]

SEED_RANDOM = -1  # what llama.cpp clients send for "draw a seed"
SEED_MAX = 2**63 - 1  # OpenAI's seed is a signed 64-bit integer
TOP_K_MAX = 262_144  # the largest vocabularies; top_k at or above a model's keeps every token
# No token of the vocabularies this appliance runs spans more characters (SmolLM2's longest: 81),
# so a prompt of more than this many characters per token of context cannot fit and is refused
# before the tokenizer spends seconds on it.
MAX_CHARS_PER_TOKEN = 128

LOGIT_BIAS_MAX = 100.0  # OpenAI's range for a logit_bias value: -100 (ban) to 100 (force)
MAX_LOGIT_BIAS = 1024  # entries of one logit_bias
TOP_LOGPROBS_MAX = 20

# The range of every numeric control, what the sampler and the penalties can use (finite values:
# an infinite penalty turns logits into NaN, a top_k past the vocabulary does nothing).
PARAM_BOUNDS: dict[str, Bound] = {
    "max_tokens": Bound(1, 131_072, "from 1 to 131072"),
    "temperature": Bound(0.0, 2.0, "from 0 (greedy) to 2"),
    "top_p": Bound(0.0, 1.0, "greater than 0 and at most 1 (1: off)", low_open=True),
    "top_k": Bound(0, TOP_K_MAX, f"from 0 (off) to {TOP_K_MAX}"),
    "min_p": Bound(0.0, 1.0, "from 0 (off) to less than 1", high_open=True),
    "repetition_penalty": Bound(0.01, 10.0, "from 0.01 to 10 (1: off)"),
    "presence_penalty": Bound(-2.0, 2.0, "from -2 to 2 (0: off)"),
    "frequency_penalty": Bound(-2.0, 2.0, "from -2 to 2 (0: off)"),
    "seed": Bound(0, SEED_MAX, f"-1 (random) or from 0 to {SEED_MAX}", random=SEED_RANDOM),
}


class ParamError(ValueError):
    """Parameters out of their range; ``fields`` names them in order, the message says why."""

    def __init__(self, problems: list[str], fields: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.fields = tuple(fields)


def max_prompt_chars(context_length: int) -> int:
    """The most characters a prompt may have and still fit ``context_length`` tokens."""
    return context_length * MAX_CHARS_PER_TOKEN


@dataclass(frozen=True)
class GenerationParams:
    """Sampling and stopping controls, named after the OpenAI parameters.

    ``temperature == 0`` is greedy decoding. ``top_k == 0``, ``top_p == 1`` and ``min_p == 0``
    disable their filters; penalties of 0 (or 1 for ``repetition_penalty``) disable theirs.
    ``seed`` makes a sampled answer reproducible; ``None`` (or ``-1``) draws from fresh entropy.
    Every numeric field must lie in its ``PARAM_BOUNDS`` range, else ``ParamError``.
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
    # (token id, bias) pairs added to the logits before the filters (OpenAI ``logit_bias``).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no logprobs; n: the chosen token's log-probability and the n most likely (0 to 20).
    logprobs: int | None = None
    # What the answer must be (a JSON Schema, any JSON object, one of some strings, tool calls).
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        if self.seed == SEED_RANDOM:
            object.__setattr__(self, "seed", None)
        problems, fields = [], []
        for name, bound in PARAM_BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not bound.admits(value):
                problems.append(f"{name} {bound.must_be()}")
                fields.append(name)
        if any(not s for s in self.stop):
            problems.append("stop strings must not be empty")
            fields.append("stop")
        if len(self.logit_bias) > MAX_LOGIT_BIAS or any(
            token < 0 or not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX for token, bias in self.logit_bias
        ):
            problems.append(f"logit_bias holds at most {MAX_LOGIT_BIAS} token ids (non-negative), "
                            f"each with a bias from -100 to 100")
            fields.append("logit_bias")
        if self.logprobs is not None and not 0 <= self.logprobs <= TOP_LOGPROBS_MAX:
            problems.append(f"top_logprobs must be from 0 to {TOP_LOGPROBS_MAX}")
            fields.append("top_logprobs")
        if problems:
            raise ParamError(problems, fields)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the ``top`` most likely at that step.

    From the distribution the sampler drew from, before temperature: the logits after the
    penalties, ``logit_bias`` and the grammar mask (a token the grammar forbids has -inf).
    """

    token: int
    text: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[int, str, bytes, float], ...] = ()


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
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens since the previous item (when asked)
    # Under a constraint, on the last item: whether the answer is complete (None: unconstrained).
    complete: bool | None = None

    @property
    def generation_tps(self) -> float:
        n = self.usage.completion_tokens
        return n / (self.generation_ms / 1000.0) if self.generation_ms > 0 else 0.0
