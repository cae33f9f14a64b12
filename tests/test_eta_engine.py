"""Waiting times against the real engine (demo model, two slots side by side): every view of the
queue reads the same snapshot of the jobs the workers took, so a job between its taking and its
first step still holds its slot, and the waits grow with the position."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from npu.engine.api import ChatRequest, Done, Failed, GenerationParams, Place
from npu.engine.engine import Engine, EngineConfig
from npu.engine.worker import DeviceWorker, ModelSpec

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "Tell me a long story about a fox."}]


@pytest.fixture(scope="module")
def engine(demo_bundle_fp32: Path) -> Iterator[Engine]:
    # A worker that takes a job and needs a moment before its first step (tokenizing, a cache slot,
    # the card's admission): the gap the views must not lose the job in.
    original = DeviceWorker._start

    def slow_start(self: DeviceWorker, job) -> None:  # type: ignore[no-untyped-def]
        time.sleep(0.3)
        original(self, job)

    DeviceWorker._start = slow_start  # type: ignore[method-assign]
    engine = Engine([ModelSpec(MODEL, "chat", demo_bundle_fp32, runtime="onnx")],
                    config=EngineConfig(queue_max=8, max_active=2))
    engine.start(timeout=120)
    yield engine
    engine.stop()
    DeviceWorker._start = original  # type: ignore[method-assign]


def _chat(engine: Engine, tokens: int, places: list[Place] | None = None) -> threading.Event:
    done = threading.Event()

    def sink(event: object) -> None:
        if isinstance(event, Place) and places is not None:
            places.append(event)
        if isinstance(event, Done | Failed):
            done.set()

    engine.submit(ChatRequest(model=MODEL, messages=HI, params=GenerationParams(max_tokens=tokens,
                                                                               temperature=0)), sink)
    return done


def test_five_at_once_on_two_slots_wait_in_order_and_the_views_agree(engine: Engine) -> None:
    _chat(engine, 12).wait(120)  # the figures are measured
    places: dict[int, list[Place]] = {i: [] for i in range(5)}
    samples: list[tuple[int, int, list[float | None], int, int]] = []
    stop = threading.Event()

    def sample() -> None:  # the views, read again and again while the five run
        while not stop.is_set():
            state, queue = engine.state(), engine.queue()
            waiting, devices = engine._plan()
            starts, _, _ = engine.places.forecast((waiting, devices))
            samples.append((state.running, queue.running, [starts.get(id(j)) for j in waiting],
                            sum(len(r) for _, r in devices), state.queue_depth))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    ends = [_chat(engine, 24, places[i]) for i in range(5)]
    for end in ends:
        assert end.wait(180)
    stop.set()
    sampler.join()
    busy = [s for s in samples if s[3] == 2 and s[2]]
    assert busy, "the sampler saw both slots busy with jobs waiting"
    for _, _, starts, _, _ in busy:
        assert starts[0] is not None and starts[0] > 0, "position 1 waits for the earliest end while both run"
        assert starts == sorted(starts), f"waits grow with the position: {starts}"  # type: ignore[type-var]
    for i in (0, 1):
        assert not [p for p in places[i] if p.state == "queued"], "a job a free slot took never waited"
    for i in (2, 3, 4):
        queued = [p for p in places[i] if p.state == "queued"]
        assert queued, f"job {i} waited and heard its place"
        assert all(p.eta_s is not None and p.eta_s > 0 for p in queued), queued
        at_one = [p.eta_s for p in queued if p.position == 1]
        assert 0.0 not in at_one, at_one


def test_the_console_list_counts_a_taken_job_as_running_as_the_state_does(engine: Engine) -> None:
    assert engine.wait_idle(60)
    done = _chat(engine, 4)
    deadline = time.monotonic() + 10
    while engine.state().running == 0:  # taken: it is in the 0.3 s before its first step
        assert time.monotonic() < deadline
        time.sleep(0.002)
    listed = [job for job in engine.jobs() if job.state == "running"]
    assert len(listed) == engine.state().running == 1, listed
    assert done.wait(60)
