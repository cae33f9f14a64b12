"""The engine with the real demo model: interleaving, the bounded queue, cancel, deadlines, stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from npu.engine.api import ChatRequest, Delta, Done, EngineError, ErrorCode, Failed, JobEvent
from npu.engine.engine import Engine, EngineConfig
from npu.engine.worker import ModelSpec
from npu.llm.params import GenerationParams

MODEL = "demo"
LONG = GenerationParams(max_tokens=400, temperature=0.8, seed=1)


class Collector:
    """A sink recording every event with the job it belongs to, in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, JobEvent]] = []
        self.lock = threading.Lock()

    def sink(self, tag: str):  # type: ignore[no-untyped-def]
        def receive(event: JobEvent) -> None:
            with self.lock:
                self.events.append((tag, event))

        return receive

    def of(self, tag: str) -> list[JobEvent]:
        with self.lock:
            return [e for t, e in self.events if t == tag]

    def terminal(self, tag: str) -> list[Done | Failed]:
        return [e for e in self.of(tag) if isinstance(e, Done | Failed)]


def ask(text: str, params: GenerationParams = LONG, **kw: object) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], params=params, **kw)  # type: ignore[arg-type]


@pytest.fixture
def make_engine(demo_bundle_fp32: Path) -> Iterator:  # type: ignore[type-arg]
    engines: list[Engine] = []

    def make(**config: object) -> Engine:
        spec = ModelSpec(MODEL, "chat", demo_bundle_fp32, runtime="onnx")
        engine = Engine([spec], config=EngineConfig(**config))  # type: ignore[arg-type]
        engine.start(timeout=120)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


def test_two_jobs_stream_interleaved_and_each_ends_once(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_active=2)
    got = Collector()
    a = engine.submit(ask("Tell a story about a lighthouse.", GenerationParams(max_tokens=24, temperature=0)),
                      got.sink("a"))
    b = engine.submit(ask("Tell a story about a forest.", GenerationParams(max_tokens=24, temperature=0)),
                      got.sink("b"))
    assert a.wait(60) and b.wait(60)
    order = [t for t, e in got.events if isinstance(e, Delta)]
    first_a_end = max(i for i, t in enumerate(order) if t == "a")
    assert "b" in order[:first_a_end], "b must stream while a is still running"
    for tag in "ab":
        (final,) = got.terminal(tag)
        assert isinstance(final, Done)
        text = "".join(e.text for e in got.of(tag) if isinstance(e, Delta))
        assert text == final.result.text and final.result.model == MODEL


def test_full_queue_refuses_at_once_with_a_retry_hint(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_active=1, queue_max=1)
    got = Collector()
    running = engine.submit(ask("one"), got.sink("run"))
    deadline = time.monotonic() + 30
    while engine.state().running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    waiting = engine.submit(ask("two"), got.sink("wait"))
    started = time.monotonic()
    with pytest.raises(EngineError) as err:
        engine.submit(ask("three"), got.sink("refused"))
    assert time.monotonic() - started < 0.5
    assert err.value.code is ErrorCode.BUSY and err.value.retry_after and err.value.retry_after >= 1
    assert engine.state().queue_depth == 1
    assert got.of("refused") == []
    running.cancel()
    waiting.cancel()
    assert running.wait(30) and waiting.wait(30)


def test_cancel_by_request_id_frees_the_slot(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_active=1)
    got = Collector()
    handle = engine.submit(ask("A very long answer please.", request_id="r-1"), got.sink("x"))
    while not got.of("x"):
        time.sleep(0.01)
    assert engine.cancel("r-1") == 1
    assert handle.wait(10)
    (final,) = got.terminal("x")
    assert isinstance(final, Failed) and final.error.code is ErrorCode.CANCELLED
    after = engine.submit(ask("Hi", GenerationParams(max_tokens=4, temperature=0)), got.sink("y"))
    assert after.wait(30) and isinstance(got.terminal("y")[0], Done)


def test_cancelling_a_waiting_job_frees_its_queue_place_at_once(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_active=1, queue_max=1)
    got = Collector()
    engine.pause("test")
    waiting = engine.submit(ask("one"), got.sink("wait"))
    with pytest.raises(EngineError):
        engine.submit(ask("two"), got.sink("refused"))
    waiting.cancel()
    assert waiting.wait(1), "a waiting job ends when cancelled, without waiting for a worker"
    (final,) = got.terminal("wait")
    assert isinstance(final, Failed) and final.error.code is ErrorCode.CANCELLED
    assert engine.state().queue_depth == 0
    again = engine.submit(ask("Hi", GenerationParams(max_tokens=4, temperature=0)), got.sink("again"))
    engine.resume()
    assert again.wait(30) and isinstance(got.terminal("again")[0], Done)
    waiting.cancel()  # cancelling twice, or after the end, changes nothing
    assert len(got.terminal("wait")) == 1


def test_a_job_past_its_deadline_is_expired_not_run_late(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine()
    engine.pause("test")
    assert engine.state().state == "paused"
    got = Collector()
    handle = engine.submit(ask("late", deadline=time.monotonic() + 0.05), got.sink("x"))
    time.sleep(0.2)
    engine.resume()
    assert handle.wait(10)
    (final,) = got.terminal("x")
    assert isinstance(final, Failed) and final.error.code is ErrorCode.EXPIRED
    assert [e for e in got.of("x") if isinstance(e, Delta)] == []



def test_a_job_counts_as_running_from_leaving_the_queue_until_its_answer(make_engine) -> None:  # type: ignore[no-untyped-def]
    """What the state listeners (the retained MQTT state) see agrees with ``state()`` at each token."""
    engine = make_engine(max_active=1)
    published: list[tuple[str, int, int]] = []
    engine.add_state_listener(lambda s: published.append((s.state, s.queue_depth, s.running)))
    seen: list[tuple[str, int, int, tuple[str, int, int]]] = []

    def sink(event: JobEvent) -> None:
        if isinstance(event, Delta):
            now = engine.state()
            seen.append((now.state, now.queue_depth, now.running, published[-1]))

    handle = engine.submit(ask("Tell a story.", GenerationParams(max_tokens=12, temperature=0)), sink)
    assert handle.wait(60) and seen
    assert engine.wait_idle(5)
    assert all(s == ("busy", 0, 1, ("busy", 0, 1)) for s in seen), seen
    assert published[-1] == ("idle", 0, 0)
    assert ("busy", 0, 1) in published and all(p[0] == "busy" for p in published[:-1]), published


def test_a_paused_queue_still_answers_jobs_at_their_deadline_and_timeout(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(request_timeout=1.0)
    engine.pause("test")
    got = Collector()
    submitted = time.monotonic()
    late = engine.submit(ask("late", deadline=submitted + 0.3), got.sink("deadline"))
    slow = engine.submit(ask("slow"), got.sink("timeout"))
    assert late.wait(3), "a job past its deadline is answered while the queue is paused"
    assert time.monotonic() - submitted < 0.9
    (final,) = got.terminal("deadline")
    assert isinstance(final, Failed) and final.error.code is ErrorCode.EXPIRED
    assert slow.wait(3), "a job never waits longer than the request timeout"
    (final,) = got.terminal("timeout")
    assert isinstance(final, Failed) and final.error.code is ErrorCode.TIMEOUT
    assert "request timeout" in final.error.message
    state = engine.state()
    assert (state.state, state.queue_depth, state.running) == ("paused", 0, 0)
    assert engine.jobs_failed == 2

@pytest.mark.parametrize(
    ("request_", "code"),
    [
        (ChatRequest(model="nope", prompt="hi"), ErrorCode.MODEL_NOT_FOUND),
        (ChatRequest(prompt=""), ErrorCode.BAD_REQUEST),
        (ChatRequest(messages=[{"role": "wizard", "content": "hi"}]), ErrorCode.BAD_REQUEST),
        (ChatRequest(prompt="word " * 5000), ErrorCode.CONTEXT_LENGTH_EXCEEDED),
    ],
)
def test_bad_requests_are_refused_with_typed_errors(  # type: ignore[no-untyped-def]
    make_engine, request_: ChatRequest, code: ErrorCode
) -> None:
    engine = make_engine()
    with pytest.raises(EngineError) as err:
        engine.submit(request_, Collector().sink("x"))
    assert err.value.code is code and err.value.message


def test_stop_answers_every_waiting_job(make_engine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(max_active=1, queue_max=8)
    got = Collector()
    handles = [engine.submit(ask(f"job {i}"), got.sink(str(i))) for i in range(4)]
    engine.stop()
    for i, handle in enumerate(handles):
        assert handle.wait(10)
        (final,) = got.terminal(str(i))
        assert isinstance(final, Failed | Done)
    assert engine.state().state == "stopped"


def test_the_warm_up_after_a_load_changes_no_answer(demo_bundle_fp32: Path) -> None:
    from npu.llm.runner import LLMRunner

    warm = LLMRunner.load(demo_bundle_fp32, backend="onnx", cache_slots=2)
    cold = LLMRunner.load(demo_bundle_fp32, backend="onnx", cache_slots=2)
    warm.warm_up()
    prompt = warm.encode_chat([{"role": "user", "content": "Name a colour."}])
    params = GenerationParams(max_tokens=12, temperature=0)
    answers = ["".join(r.text for r in runner.stream_generate(prompt, params)) for runner in (warm, cold)]
    assert answers[0] == answers[1] and answers[0]
