"""Speech to text: the audio resampled for its model on admission, one step per decoded segment
(Whisper decodes 30-second windows), each segment sent as soon as it is known."""

from __future__ import annotations

import dataclasses
import itertools
import string
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from npu.engine.api import (
    Done,
    EngineError,
    ErrorCode,
    TranscriptionRequest,
    TranscriptionResult,
    TranscriptSegment,
)
from npu.engine.config import ModelSpec
from npu.engine.job import WorkerJob
from npu.engine.kinds import ModelFacts, StepOutcome
from npu.engine.metrics import EngineMetrics
from npu.speech.audio import resample
from npu.speech.params import Segment, SpeechInputError
from npu.speech.transcribers import load_transcriber

MIN_AUDIO_SECONDS = 0.1
# Every code a front door lets through as ``language`` (LANGUAGE_PATTERN: two or three letters).
LANGUAGE_CODES = tuple("".join(letters) for n in (2, 3)
                       for letters in itertools.product(string.ascii_lowercase, repeat=n))
_languages: weakref.WeakKeyDictionary[Any, list[str] | None] = weakref.WeakKeyDictionary()


def languages_of(runner: Any) -> list[str] | None:
    """The codes the model's own ``check_language`` takes, asked once per loaded model (about 30 ms),
    so a front door can refuse a language before the audio is sent; None: it takes every code."""
    try:
        return _languages[runner]
    except KeyError:
        pass
    except TypeError:  # a runner that cannot be weakly referenced: not remembered
        return _ask_languages(runner)
    _languages[runner] = found = _ask_languages(runner)
    return found


def _ask_languages(runner: Any) -> list[str] | None:
    taken = []
    for code in LANGUAGE_CODES:
        try:
            runner.check_language(code)
        except (ValueError, SpeechInputError):
            continue
        taken.append(code)
    return None if len(taken) == len(LANGUAGE_CODES) else taken


class Transcriber(Protocol):
    backend: str
    name: str
    rate: int

    def check_language(self, language: str | None) -> None: ...
    def transcribe_steps(self, samples: np.ndarray, language: str | None = None) -> Iterator[Segment]: ...
    def close(self) -> None: ...


@dataclass
class TranscriptState:
    segments: list[Segment] = field(default_factory=list)
    compute_s: float = 0.0
    last_at: float | None = None


def state_of(job: WorkerJob) -> TranscriptState:
    state = job.state
    assert isinstance(state, TranscriptState)
    return state


def steps_of(model: Transcriber, samples: np.ndarray, language: str | None) -> Iterator[Segment | None]:
    yield from model.transcribe_steps(samples, language)
    yield None


class SttKind:
    name = "stt"
    request_type = TranscriptionRequest

    def load(self, spec: ModelSpec, device_id: int, cache_slots: int) -> Transcriber:
        model: Transcriber = load_transcriber(Path(spec.path), spec.runtime, device_id)
        return model

    def facts(self, runner: Any) -> ModelFacts:
        return ModelFacts(sample_rate=getattr(runner, "rate", None), languages=languages_of(runner))

    def model_not_found(self, requested: str | None, available: list[str]) -> EngineError:
        if not available:
            return EngineError(ErrorCode.MODEL_NOT_FOUND, (
                "no speech-to-text model is installed here; 'appliance models demo' installs Whisper "
                "tiny.en (docs/INSTALL.md)"))
        return EngineError(ErrorCode.MODEL_NOT_FOUND,
                           f"no speech-to-text model {requested!r} here; installed: {', '.join(available)}")

    def admit(self, request: TranscriptionRequest,
              runner: Any) -> tuple[TranscriptionRequest, TranscriptState]:
        clip = request.audio
        if clip.seconds < MIN_AUDIO_SECONDS:
            raise EngineError(ErrorCode.BAD_REQUEST, (
                f"the audio is {clip.seconds * 1e3:.0f} ms long; "
                f"send at least {MIN_AUDIO_SECONDS * 1e3:.0f} ms"), details={"param": "audio"})
        try:
            runner.check_language(request.language)
        except (ValueError, SpeechInputError) as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc), details={"param": "language"}) from exc
        try:
            if clip.rate != runner.rate:  # here, on the caller's thread: the device's time is for models
                request = dataclasses.replace(request, audio=resample(clip, runner.rate))
        except (ValueError, SpeechInputError) as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc), details={"param": "audio"}) from exc
        return request, TranscriptState()

    def steps(self, job: WorkerJob, runner: Any) -> Iterator[Segment | None]:
        request = job.handle.request
        assert isinstance(request, TranscriptionRequest)
        state_of(job).last_at = time.monotonic()
        return steps_of(runner, request.audio.samples, request.language)

    def advance(self, job: WorkerJob, step: Segment | None, now: float,
                metrics: EngineMetrics) -> StepOutcome:
        state = state_of(job)
        if state.last_at is not None:
            state.compute_s += now - state.last_at
        state.last_at = now
        if step is not None:
            if step.text:
                state.segments.append(step)
                return StepOutcome(events=(TranscriptSegment(step),))
            return StepOutcome()
        handle = job.handle
        request = handle.request
        assert isinstance(request, TranscriptionRequest)
        result = TranscriptionResult(
            text=" ".join(s.text for s in state.segments).strip(), segments=list(state.segments),
            language=request.language or "en", audio_seconds=request.audio.seconds, model=job.model_id,
            transcribe_ms=state.compute_s * 1e3, total_ms=(now - handle.submitted) * 1e3,
            queued_ms=(job.started - handle.submitted) * 1e3)
        return StepOutcome(end=Done(result))

    def failure(self, exc: Exception) -> EngineError | None:
        if isinstance(exc, SpeechInputError | ValueError):
            return EngineError(ErrorCode.BAD_REQUEST, str(exc))
        return None

    def retry(self, job: WorkerJob) -> None:
        """Segments are sent as decoded; a retry decodes again from the start and sends them again."""
        job.state = TranscriptState()

    def record(self, metrics: EngineMetrics, model_id: str, done: Done) -> None:
        result = done.result
        assert isinstance(result, TranscriptionResult)
        metrics.for_model(model_id).e2e.observe(result.total_ms / 1e3)
        metrics.audio_seconds.labels(model_id).inc(result.audio_seconds)
        if result.audio_seconds:
            rtf = result.transcribe_ms / 1e3 / result.audio_seconds
            metrics.realtime_factor.labels(model_id).observe(rtf)
        metrics.success.labels(model_id, "stt").inc()


KIND = SttKind()
