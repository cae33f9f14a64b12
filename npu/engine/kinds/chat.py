"""Chat and plain completions: tokenized on admission, streamed as text deltas, retried without
repeating a word the client already has."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from npu.engine.api import (
    ChatRequest,
    ChatResult,
    Delta,
    Done,
    EngineError,
    ErrorCode,
    Failed,
    JobEvent,
    Progress,
)
from npu.engine.config import ModelSpec
from npu.engine.eta import Work
from npu.engine.job import WorkerJob
from npu.engine.kinds import ModelFacts, StepOutcome
from npu.engine.metrics import EngineMetrics
from npu.llm.kv_cache import CacheMemoryError
from npu.llm.params import GenerationParams, GenerationResponse, ParamError, TokenLogprob
from npu.llm.runner import ContextLengthError, LLMRunner

logger = logging.getLogger(__name__)


@dataclass
class ChatState:
    """A chat job's progress, kept across a retry after a device reset."""

    prompt_ids: list[int]
    parts: list[str] = field(default_factory=list)  # the text sent so far
    resume: str = ""  # text already sent before a reset, to be matched again and not re-sent
    last_token_at: float | None = None  # None until the first generated token
    tokens_counted: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # every token's, when asked
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet in a Delta


def state_of(job: WorkerJob) -> ChatState:
    state = job.state
    assert isinstance(state, ChatState)
    return state


class ChatKind:
    name = "chat"
    request_type = ChatRequest

    def load(self, spec: ModelSpec, device_id: int, cache_slots: int) -> LLMRunner:
        runner = LLMRunner.load(spec.path, backend=spec.runtime, device_id=device_id, cache_slots=cache_slots)
        keep_prefixes(runner, spec)
        return runner

    def facts(self, runner: Any) -> ModelFacts:
        return ModelFacts(context_length=getattr(runner, "context_length", None),
                          max_prompt_tokens=getattr(runner, "max_prompt_tokens", None))

    def model_not_found(self, requested: str | None, available: list[str]) -> EngineError:
        names = ", ".join(available) or "none"
        return EngineError(ErrorCode.MODEL_NOT_FOUND, f"no chat model {requested!r} here; available: {names}")

    def admit(self, request: ChatRequest, runner: Any) -> tuple[ChatRequest, ChatState]:
        if request.params.seed is None:
            # A drawn seed makes a job retried after a device reset repeat itself exactly.
            params = dataclasses.replace(request.params, seed=secrets.randbits(63))
            request = dataclasses.replace(request, params=params)
        assert isinstance(runner, LLMRunner)
        try:
            runner.check_params(request.params)
            if request.messages is not None:
                prompt_ids = runner.encode_chat(request.messages, enable_thinking=request.enable_thinking,
                                                tools=request.tools)
            else:
                prompt_ids = runner.encode(
                    request.prompt or "", parse_special_tokens=request.parse_special_tokens
                )
            runner.check_prompt(prompt_ids)
        except ContextLengthError as exc:
            details = {"prompt_tokens": exc.prompt_tokens, "max_prompt_tokens": exc.limit,
                       "context_length": runner.context_length}
            raise EngineError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc), details=details) from exc
        except ValueError as exc:
            named = {"param": exc.fields[0]} if isinstance(exc, ParamError) else None
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc), details=named) from exc
        return request, ChatState(prompt_ids=prompt_ids)

    def steps(self, job: WorkerJob, runner: Any) -> Iterator[GenerationResponse]:
        request = job.handle.request
        assert isinstance(runner, LLMRunner) and isinstance(request, ChatRequest)
        return runner.stream_generate(state_of(job).prompt_ids, request.params)

    def advance(self, job: WorkerJob, step: GenerationResponse, now: float,
                metrics: EngineMetrics) -> StepOutcome:
        state = state_of(job)
        if step.usage.completion_tokens > state.tokens_counted:
            count_tokens(job, state, step.usage.completion_tokens, now, metrics)
        text = step.text
        if state.resume and text:
            n = min(len(text), len(state.resume))
            if text[:n] != state.resume[:n]:
                message = "the device was reset and the answer did not repeat identically; it was stopped"
                return StepOutcome(end=Failed(EngineError(ErrorCode.DEVICE_RESET, message)))
            state.resume, text = state.resume[n:], text[n:]
        events: tuple[JobEvent, ...] = ()
        state.unsent_logprobs.extend(step.logprobs)
        if text:
            state.parts.append(text)
            state.logprobs.extend(state.unsent_logprobs)
            events = (Delta(text, step.token, tuple(state.unsent_logprobs)),)
            state.unsent_logprobs.clear()
        elif step.token is None and step.finish_reason is None:
            events = (Progress(step.prompt_done, step.usage.prompt_tokens),)
        if step.finish_reason is None:
            return StepOutcome(events=events)
        handle = job.handle
        result = ChatResult(
            text="".join(state.parts),
            model=job.model_id,
            finish_reason=step.finish_reason,
            usage=step.usage,
            prompt_ms=step.prompt_ms,
            generation_ms=step.generation_ms,
            total_ms=(time.monotonic() - handle.submitted) * 1e3,
            queued_ms=(job.started - handle.submitted) * 1e3,
            logprobs=(*state.logprobs, *state.unsent_logprobs),
            complete=step.complete,
        )
        return StepOutcome(events=events, end=Done(result))

    def failure(self, exc: Exception) -> EngineError | None:
        if isinstance(exc, CacheMemoryError):  # the card cannot hold one more conversation now
            return EngineError(ErrorCode.BUSY, str(exc))
        return None

    def retry(self, job: WorkerJob) -> None:
        state = state_of(job)
        state.resume = "".join(state.parts)
        state.logprobs.clear()  # the retry reports every token again
        state.unsent_logprobs.clear()

    def record(self, metrics: EngineMetrics, model_id: str, done: Done) -> None:
        result = done.result
        assert isinstance(result, ChatResult)
        model = metrics.for_model(model_id)
        model.prompt_tokens.inc(result.usage.prompt_tokens)
        model.cached_tokens.inc(result.usage.cached_tokens)
        model.e2e.observe(result.total_ms / 1e3)
        metrics.success.labels(model_id, result.finish_reason).inc()

    # waiting times (npu.engine.eta): prefill up to the first token, then one decode step a token
    def eta_phase(self, job: WorkerJob, step: GenerationResponse) -> str:
        return "prefill" if state_of(job).tokens_counted == 0 else "decode"

    def eta_work(self, job: WorkerJob) -> dict[str, Work]:
        request = job.handle.request
        assert isinstance(request, ChatRequest)
        limit = max(0, request.params.max_tokens - 1)
        return {"prefill": Work(len(state_of(job).prompt_ids)), "decode": Work(None, at_most=limit)}

    def eta_units(self, job: WorkerJob, result: ChatResult) -> dict[str, float]:
        usage = result.usage
        return {"prefill": max(1, usage.prompt_tokens - usage.cached_tokens),
                "decode": max(0, usage.completion_tokens - 1)}

    def eta_progress(self, job: WorkerJob) -> tuple[int, int | None]:
        request = job.handle.request
        assert isinstance(request, ChatRequest)
        return state_of(job).tokens_counted, request.params.max_tokens


def keep_prefixes(runner: LLMRunner, spec: ModelSpec) -> None:
    """Prefill the system prompts of the model's personas and keep them warm (``LLMRunner.keep_prefix``).

    This runs at every load, so a reload or a card recovery rebuilds them before the first
    request. One that cannot be kept (the card's memory is full) is logged; the model still serves.
    """
    for system in spec.prefixes:
        try:
            rows = runner.keep_prefix([{"role": "system", "content": system}])
            # One turn after it of nearly a chunk, so the runtime's first run at these lengths (its
            # buffers grown to a question's size) is not a visitor's.
            turn = [{"role": "system", "content": system}, {"role": "user", "content": "Hello. " * 40}]
            runner.generate(runner.encode_chat(turn), GenerationParams(max_tokens=2, temperature=0.0))
        except Exception as exc:
            logger.warning("%s: a persona's system prompt could not be kept warm: %s", spec.id, exc)
            continue
        if rows == 0:
            logger.info("%s: a persona's system prompt is shorter than one prefill chunk (%d tokens); "
                        "there is nothing to keep warm", spec.id, runner.stack.chunk)


def count_tokens(job: WorkerJob, state: ChatState, total: int, now: float, metrics: EngineMetrics) -> None:
    """Feed the latency histograms and the token counter as the job's usage grows."""
    model = metrics.for_model(job.model_id)
    if state.last_token_at is None:
        model.ttft.observe(now - job.handle.submitted)
        model.queue_time.observe(job.started - job.handle.submitted)
    else:
        model.itl.observe(now - state.last_token_at)
    model.generation_tokens.inc(total - state.tokens_counted)
    state.tokens_counted = total
    state.last_token_at = now


KIND = ChatKind()
