"""Recovery on a card monitored through pyaxcl: reboot with axcl-smi, close the old sessions, reload.

The card is the simulated one of ``tests/fake_axcl.py`` (pyaxcl and axcl-smi share its state); the
models are a tiny real LLM on the CPU twin, each holding an ``NpuSession`` on the card, so a hung
card blocks its steps the way a real one blocks ``axclrtEngineExecute``.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_jobs import Job, drive_watchdog
from fake_axcl import SMI, FakeAxcl, NpuSession, install
from gguf_factory import write_tiny_gguf

from npu.convert import convert_gguf
from npu.device.axcl import AxclMonitor
from npu.device.base import DeviceFault
from npu.device.smi import SmiMonitor
from npu.engine.api import Done, ErrorCode, Failed
from npu.engine.engine import Engine, EngineConfig
from npu.engine.recovery import RecoveryConfig
from npu.engine.worker import ModelSpec, Runner, load_runner
from npu.llm.params import GenerationParams

GREEDY = GenerationParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-axcl")
    return convert_gguf(write_tiny_gguf(root / "tiny.gguf", "qwen2"), root / "bundle")


class Card:
    """The loader's record: which runner was loaded and closed, in order, and on which card."""

    def __init__(self, fake: FakeAxcl) -> None:
        self.fake = fake
        self.order: list[tuple[str, str]] = []
        self.fail_next_step = threading.Event()
        self._names = itertools.count()
        self._lock = threading.Lock()

    def note(self, what: str, name: str) -> None:
        with self._lock:
            self.order.append((what, name))

    def loader(self, spec: ModelSpec, index: int, slots: int) -> Runner:
        name = f"{spec.id}@{index}#{next(self._names)}"
        session = NpuSession(self.fake.store, index, name)  # opened by index, as PyAXEngine does
        runner = load_runner(spec, index, slots)
        stream_generate, close = runner.stream_generate, runner.close  # type: ignore[union-attr]

        def steps(*args: Any) -> Iterator[Any]:
            inner = stream_generate(*args)
            try:
                while True:
                    try:
                        session.run()  # the NPU call: blocks while the card hangs
                    except RuntimeError as exc:  # what the axengine backend turns into DeviceFault
                        raise DeviceFault(str(exc)) from exc
                    if self.fail_next_step.is_set():
                        self.fail_next_step.clear()
                        raise ValueError("a bug in a step")
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                    yield item
            finally:
                inner.close()

        def closing() -> None:
            self.note("close", name)
            session.close()
            close()

        runner.stream_generate = steps  # type: ignore[method-assign,union-attr]
        runner.close = closing  # type: ignore[method-assign]
        self.note("load", name)
        return runner


Made = tuple[Engine, Card, list[tuple[str, dict[str, Any]]]]


@pytest.fixture
def make(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., Made]]:
    made: list[Engine] = []

    def build(ids: tuple[int, ...] = (1,), devices: tuple[int, ...] = (0,), models: int = 2,
              attempts: int = 2, reset_timeout: float = 10.0, **config: Any) -> Made:
        fake = install(monkeypatch, tmp_path, ids, reboot_seconds=0.3)
        card = Card(fake)
        monitor = AxclMonitor(SmiMonitor(SMI), poll=0.05, reset_timeout=reset_timeout)
        specs = [ModelSpec(f"m{i}", "chat", tiny_bundle, runtime="onnx") for i in range(models)]
        engine = Engine(specs, config=EngineConfig(**{"max_active": 1, "step_timeout": 0.5, **config}),
                        device_ids=devices, loader=card.loader, monitor=monitor,
                        recovery=RecoveryConfig(attempts=attempts, backoff=0.1))
        events: list[tuple[str, dict[str, Any]]] = []
        engine.add_event_listener(lambda name, fields: events.append((name, fields)))
        engine.start(timeout=60)
        made.append(engine)
        return engine, card, events

    yield build
    for engine in made:
        engine.stop()


def closed_before_loaded(order: list[tuple[str, str]], old: list[str]) -> bool:
    """Every old runner was closed, each before the first load that followed on the same card."""
    cards = {name.split("@")[1].split("#")[0] for name in old}
    closes = [order.index(("close", name)) for name in old if ("close", name) in order]
    later_loads = [i for i, (what, name) in enumerate(order)
                   if what == "load" and name not in old and name.split("@")[1].split("#")[0] in cards]
    return len(closes) == len(old) and bool(later_loads) and max(closes) < min(later_loads)


def test_a_hung_card_is_rebooted_its_sessions_closed_then_reloaded(make) -> None:  # type: ignore[no-untyped-def]
    engine, card, events = make()
    fake = card.fake
    reference = Job(engine, GREEDY, model="m0")
    assert reference.handle.wait(30)
    expected = reference.final.result.text  # type: ignore[union-attr]
    running, *waiting = [Job(engine, GREEDY, model=m) for m in ("m0", "m1", "m0")]
    running.wait_for_text()
    old = [name for what, name in card.order if what == "load"]
    fake.store.set(0, state="hung")  # the NPU stops answering: the running step blocks
    drive_watchdog(engine, lambda: engine.state().state == "recovering", timeout=10)
    assert engine.state().queue_depth >= 2, "waiting jobs stay queued during the recovery"
    drive_watchdog(engine, lambda: all(j.handle.wait(0) for j in [running, *waiting]))
    for job in (running, *waiting):
        assert isinstance(job.final, Done), job.final
        assert job.final.result.text == expected and job.streamed == expected, "no word repeated"
    assert [n for n, _ in events] == ["device_hung", "recovery_started", "jobs_retried", "device_reset",
                                      "models_reloaded", "recovered"]
    assert fake.store.smi_calls() == [{"args": ["reboot", "-d", "0"], "answer": "y"}]
    assert closed_before_loaded(card.order, old), card.order
    assert fake.called("reset_device") == [], "axclrtResetDevice is never called"
    assert set(fake.called("set_device")) <= {1} and set(fake.called("get_device_utilization_rate")) == {1}
    # On the card: the reboot, then the old sessions closed, then the new ones opened after the boot.
    kinds = [(kind, boots) for kind, _id, boots, *_ in fake.store.events()]
    reboot = kinds.index(("reboot", 1))
    assert kinds[reboot + 1:reboot + 3] == [("close", 0), ("close", 0)]
    assert kinds[reboot + 3:] == [("open", 1), ("open", 1)]
    assert engine.state().state == "idle"


def test_restart_takes_the_same_path_and_keeps_the_other_card_serving(make) -> None:  # type: ignore[no-untyped-def]
    engine, card, events = make(ids=(1, 3), devices=(0, 1), models=1)
    fake = card.fake
    old = [name for what, name in card.order if what == "load" and name.startswith("m0@1")]
    assert engine.restart("asked") == [0, 1]
    drive_watchdog(engine, lambda: [n for n, _ in events].count("recovered") == 2)
    reboots = sorted(call["args"][-1] for call in fake.store.smi_calls())
    assert reboots == ["0", "1"] and all(c["answer"] == "y" for c in fake.store.smi_calls())
    assert closed_before_loaded(card.order, old), card.order
    assert fake.called("reset_device") == []
    opened = {(e[1], e[3].split("#")[0]) for e in fake.store.events() if e[0] == "open"}
    assert opened == {(1, "m0@0"), (3, "m0@1")}, "card index 1 opens device id 3"
    jobs = [Job(engine, GenerationParams(max_tokens=4, temperature=0), model="m0") for _ in range(3)]
    drive_watchdog(engine, lambda: all(j.handle.wait(0) for j in jobs))
    assert all(isinstance(j.final, Done) for j in jobs)


def test_a_card_that_stays_dead_ends_failed_without_a_reset_device(make) -> None:  # type: ignore[no-untyped-def]
    engine, card, events = make(models=1, reset_timeout=0.6)
    fake = card.fake
    job = Job(engine, GenerationParams(max_tokens=200, temperature=0), model="m0")
    job.wait_for_text()
    fake.store.set(0, state="dead", heals=False)
    drive_watchdog(engine, lambda: engine.state().state == "failed")
    assert isinstance(job.final, Failed) and job.final.error.code is ErrorCode.UNAVAILABLE
    names = [n for n, _ in events]
    assert names.count("recovery_attempt_failed") == 2 and names[-1] == "device_failed"
    assert len(fake.store.smi_calls()) == 2 and fake.called("reset_device") == []
    assert "reboot -d 0 did not succeed" in dict(events)["device_failed"]["reason"]


def test_a_failed_step_does_not_look_hung_to_the_watchdog(make) -> None:  # type: ignore[no-untyped-def]
    engine, card, events = make(models=1)
    card.fail_next_step.set()
    job = Job(engine, GREEDY, model="m0")
    assert job.handle.wait(10)
    assert isinstance(job.final, Failed) and job.final.error.code is ErrorCode.INTERNAL
    time.sleep(0.7)  # longer than step_timeout, with nothing running
    assert engine.check_watchdog() == [] and not events, "no recovery for a step that already ended"
