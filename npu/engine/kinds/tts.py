"""Text to speech: one step per sentence, each sentence's audio sent as soon as it is made, so a
speaker starts playing while the rest is still being synthesised."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from npu.engine.api import (
    Done,
    EngineError,
    ErrorCode,
    SpeechAudio,
    SpeechRequest,
    SpeechResult,
)
from npu.engine.config import ModelSpec
from npu.engine.job import WorkerJob
from npu.engine.kinds import ModelFacts, StepOutcome
from npu.engine.metrics import EngineMetrics
from npu.speech.params import Piece, SpeechInputError
from npu.speech.voices import load_voice


class Voice(Protocol):
    backend: str
    name: str
    rate: int

    def speak_steps(self, text: str, speed: float = 1.0) -> Iterator[Piece]: ...
    def close(self) -> None: ...


@dataclass
class SpeechState:
    """What a speech job has sent: a retry after a device reset skips the sentences already out."""

    pieces: list[Piece] = field(default_factory=list)
    skip: int = 0
    compute_s: float = 0.0
    last_at: float | None = None


def state_of(job: WorkerJob) -> SpeechState:
    state = job.state
    assert isinstance(state, SpeechState)
    return state


def steps_of(voice: Voice, text: str, speed: float) -> Iterator[Piece | None]:
    """The voice's pieces, and None once they are all out (the job's last step)."""
    yield from voice.speak_steps(text, speed)
    yield None


class TtsKind:
    name = "tts"
    request_type = SpeechRequest

    def load(self, spec: ModelSpec, device_id: int, cache_slots: int) -> Voice:
        voice: Voice = load_voice(Path(spec.path), spec.runtime, device_id)
        return voice

    def facts(self, runner: Any) -> ModelFacts:
        return ModelFacts(sample_rate=getattr(runner, "rate", None))

    def model_not_found(self, requested: str | None, available: list[str]) -> EngineError:
        if not available:
            return EngineError(ErrorCode.MODEL_NOT_FOUND, (
                "no voice is installed here; 'appliance models demo' installs the CPU voice "
                "(docs/INSTALL.md)"))
        return EngineError(ErrorCode.MODEL_NOT_FOUND,
                           f"no voice {requested!r} here; installed: {', '.join(available)}")

    def admit(self, request: SpeechRequest, runner: Any) -> tuple[SpeechRequest, SpeechState]:
        return request, SpeechState()

    def steps(self, job: WorkerJob, runner: Any) -> Iterator[Piece | None]:
        request = job.handle.request
        assert isinstance(request, SpeechRequest)
        state = state_of(job)
        state.last_at = time.monotonic()
        return steps_of(runner, request.params.text, request.params.speed)

    def advance(self, job: WorkerJob, step: Piece | None, now: float, metrics: EngineMetrics) -> StepOutcome:
        state = state_of(job)
        if state.last_at is not None:
            state.compute_s += now - state.last_at
        state.last_at = now
        if step is not None:
            if state.skip:  # sent before a device reset: the listener already has it
                state.skip -= 1
                return StepOutcome()
            state.pieces.append(step)
            return StepOutcome(events=(SpeechAudio(step, len(state.pieces) - 1),))
        handle = job.handle
        pieces = state.pieces
        rate = pieces[0].rate if pieces else 0
        pcm = b"".join(p.pcm for p in pieces)
        result = SpeechResult(
            pcm=pcm, rate=rate, model=job.model_id, audio_seconds=len(pcm) / 2 / rate if rate else 0.0,
            synth_ms=state.compute_s * 1e3, total_ms=(now - handle.submitted) * 1e3,
            queued_ms=(job.started - handle.submitted) * 1e3)
        return StepOutcome(end=Done(result))

    def failure(self, exc: Exception) -> EngineError | None:
        if isinstance(exc, SpeechInputError):
            return EngineError(ErrorCode.BAD_REQUEST, str(exc))
        return None

    def retry(self, job: WorkerJob) -> None:
        state = state_of(job)
        state.skip = len(state.pieces)  # the pieces sent stay; the retry makes and drops them again

    def record(self, metrics: EngineMetrics, model_id: str, done: Done) -> None:
        result = done.result
        assert isinstance(result, SpeechResult)
        metrics.for_model(model_id).e2e.observe(result.total_ms / 1e3)
        metrics.audio_seconds.labels(model_id).inc(result.audio_seconds)
        if result.audio_seconds:
            metrics.realtime_factor.labels(model_id).observe(result.synth_ms / 1e3 / result.audio_seconds)
        metrics.success.labels(model_id, "tts").inc()


KIND = TtsKind()
