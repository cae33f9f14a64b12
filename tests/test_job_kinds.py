"""A job kind is one module: the engine and its workers run a kind they were never told about.

The kind here (an echo that answers a word per step) is added to the registry the way a module in
``npu/engine/kinds`` is found; nothing of the engine is edited. Its model loads, its requests are
checked on submit, its steps stream, a cancel stops it, and its answer and metrics arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from npu.engine.api import Done, EngineError, ErrorCode, Failed, JobEvent, Place, Priority, Progress
from npu.engine.config import ModelSpec
from npu.engine.engine import Engine
from npu.engine.job import WorkerJob
from npu.engine.kinds import ModelFacts, StepOutcome, all_kinds
from npu.engine.metrics import EngineMetrics


@dataclass(frozen=True)
class EchoRequest:
    text: str
    model: str | None = None
    priority: Priority = Priority.NORMAL
    deadline: float | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class EchoResult:
    text: str
    total_ms: float = 0.0


class EchoModel:
    backend = "host"

    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class EchoKind:
    name = "echo"
    request_type = EchoRequest

    def load(self, spec: ModelSpec, device_id: int, cache_slots: int) -> EchoModel:
        return EchoModel()

    def facts(self, runner: Any) -> ModelFacts:
        return ModelFacts(context_length=7)

    def model_not_found(self, requested: str | None, available: list[str]) -> EngineError:
        return EngineError(ErrorCode.MODEL_NOT_FOUND, f"no echo model {requested!r}")

    def admit(self, request: EchoRequest, runner: Any) -> tuple[EchoRequest, list[str]]:
        if not request.text:
            raise EngineError(ErrorCode.BAD_REQUEST, "nothing to echo")
        return request, request.text.split()

    def steps(self, job: WorkerJob, runner: Any) -> Iterator[str]:
        gate = job.handle.request.text == "wait here" and GATE
        for word in job.state:
            if gate:
                gate.wait(5)
            yield word

    def advance(self, job: WorkerJob, step: str, now: float, metrics: EngineMetrics) -> StepOutcome:
        job.state = job.state[1:]
        progress = (Progress(prompt_done=1, prompt_tokens=1),)
        if job.state:
            return StepOutcome(events=progress)
        return StepOutcome(events=progress, end=Done(EchoResult(job.handle.request.text)))  # type: ignore[arg-type]

    def failure(self, exc: Exception) -> EngineError | None:
        return None

    def retry(self, job: WorkerJob) -> None:
        pass

    def record(self, metrics: EngineMetrics, model_id: str, done: Done) -> None:
        metrics.success.labels(model_id, "echo").inc()


GATE = threading.Event()


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    monkeypatch.setitem(all_kinds(), "echo", EchoKind())
    GATE.clear()
    engine = Engine([ModelSpec("echo-1", "echo", Path("unused"))])
    engine.start(timeout=10)
    yield engine
    GATE.set()
    engine.stop()


def run(engine: Engine, request: EchoRequest) -> list[JobEvent]:
    events: list[JobEvent] = []
    handle = engine.submit(request, events.append)  # type: ignore[arg-type]
    assert handle.wait(10)
    return events


def test_a_kind_the_engine_was_never_told_about_runs_end_to_end(engine: Engine) -> None:
    heard = run(engine, EchoRequest("one two three"))
    places = [e for e in heard if isinstance(e, Place)]
    assert any(p.state == "running" for p in places), "even a kind the engine never knew hears its place"
    events = [e for e in heard if not isinstance(e, Place)]
    assert [type(e) for e in events] == [Progress, Progress, Progress, Done]
    done = events[-1]
    assert isinstance(done, Done) and done.result.text == "one two three"  # type: ignore[union-attr]
    (info,) = engine.models()
    assert (info.kind, info.loaded, info.backend, info.context_length) == ("echo", True, "host", 7)
    assert engine.registry.get_sample_value(
        "appliance_request_success_total", {"model_name": "echo-1", "finished_reason": "echo"}) == 1
    assert engine.jobs_done == 1


def test_its_checks_refuse_on_submit_and_its_jobs_cancel(engine: Engine) -> None:
    with pytest.raises(EngineError) as refused:
        engine.submit(EchoRequest(""), lambda event: None)  # type: ignore[arg-type]
    assert refused.value.code == ErrorCode.BAD_REQUEST
    with pytest.raises(EngineError) as unknown:
        engine.submit(EchoRequest("hi", model="other"), lambda event: None)  # type: ignore[arg-type]
    assert unknown.value.code == ErrorCode.MODEL_NOT_FOUND
    events: list[JobEvent] = []
    handle = engine.submit(EchoRequest("wait here"), events.append)  # type: ignore[arg-type]
    handle.cancel()  # waiting or at its first step: either way it ends cancelled
    GATE.set()
    assert handle.wait(10)
    assert isinstance(events[-1], Failed) and events[-1].error.code == ErrorCode.CANCELLED


def test_a_model_of_an_unknown_kind_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match="no job kind 'speech'"):
        Engine([ModelSpec("s", "speech", Path("unused"))])
