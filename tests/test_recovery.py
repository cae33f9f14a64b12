"""Recovery and thermal protection with the simulated card and the real demo model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from engine_jobs import Job, drive_watchdog

from appliance.health import HealthChecks
from npu.device.sim import SimMonitor
from npu.device.thermal import ThermalLevel, ThermalLimits
from npu.engine.api import Done, EngineError, ErrorCode, Failed
from npu.engine.engine import Engine, EngineConfig
from npu.engine.recovery import RecoveryConfig
from npu.engine.worker import ModelSpec
from npu.llm.params import GenerationParams

Made = tuple[Engine, SimMonitor, list[tuple[str, dict]]]


@pytest.fixture
def make(demo_bundle_fp32: Path) -> Iterator[Callable[..., Made]]:
    made: list[Engine] = []

    def build(**config: object) -> Made:
        sim = SimMonitor(reset_seconds=0.05)
        engine = Engine(
            [ModelSpec("demo", "chat", demo_bundle_fp32, runtime="onnx")],
            config=EngineConfig(**{"max_active": 1, "step_timeout": 1.0, **config}),  # type: ignore[arg-type]
            monitor=sim, recovery=RecoveryConfig(attempts=2, backoff=0.1),
        )
        events: list[tuple[str, dict]] = []
        engine.add_event_listener(lambda name, fields: events.append((name, fields)))
        engine.start(timeout=120)
        made.append(engine)
        return engine, sim, events

    yield build
    for engine in made:
        if engine.monitor is not None:
            engine.monitor.close()  # ends a hang still in progress
        engine.stop()


def test_a_hung_step_is_recovered_and_no_job_is_lost_or_repeated(make) -> None:  # type: ignore[no-untyped-def]
    engine, sim, events = make()
    reference = Job(engine)
    assert reference.handle.wait(60)
    expected = reference.final.result.text  # type: ignore[union-attr]
    running, *waiting = [Job(engine) for _ in range(3)]
    running.wait_for_text()
    sim.set(0, fault="hang")
    drive_watchdog(engine, lambda: engine.state().state == "recovering", timeout=10)
    assert engine.state().queue_depth >= 2, "waiting jobs stay queued during the recovery"
    drive_watchdog(engine, lambda: all(j.handle.wait(0) for j in [running, *waiting]))
    for job in (running, *waiting):
        assert isinstance(job.final, Done), job.final
        assert job.final.result.text == expected
        assert job.streamed == expected, "the retried job continues its stream without repeating a word"
    names = [n for n, _ in events]
    assert names == ["device_hung", "recovery_started", "jobs_retried", "device_reset", "models_reloaded",
                     "recovered"]
    assert sim.resets(0) == 1 and engine.state().state == "idle"
    sample = engine.metrics.registry.get_sample_value
    assert sample("appliance_device_recoveries_total", {"device": "0", "outcome": "recovered"}) == 1


def test_a_job_hit_by_two_resets_is_answered_device_reset(make) -> None:  # type: ignore[no-untyped-def]
    engine, sim, events = make()
    job = Job(engine, GenerationParams(max_tokens=200, temperature=0.8))
    job.wait_for_text()
    sim.set(0, fault="reset")
    drive_watchdog(engine, lambda: any(n == "recovered" for n, _ in events))
    job.wait_for_text()
    sim.set(0, fault="reset")
    drive_watchdog(engine, lambda: job.handle.wait(0))
    final = job.final
    assert isinstance(final, Failed) and final.error.code is ErrorCode.DEVICE_RESET
    drive_watchdog(engine, lambda: engine.state().state == "idle")
    after = Job(engine)
    assert after.handle.wait(60) and isinstance(after.final, Done), "the engine serves again"


def test_a_dead_device_ends_failed_with_clear_errors_and_a_live_engine(make) -> None:  # type: ignore[no-untyped-def]
    engine, sim, events = make()
    running = Job(engine, GenerationParams(max_tokens=200, temperature=0))
    waiting = Job(engine)
    running.wait_for_text()
    sim.set(0, fault="dead")
    drive_watchdog(engine, lambda: engine.state().state == "failed")
    for job in (running, waiting):
        assert job.handle.wait(5)
        assert isinstance(job.final, Failed) and job.final.error.code is ErrorCode.UNAVAILABLE
        assert "could not be recovered" in job.final.error.message
    with pytest.raises(EngineError) as err:
        Job(engine)
    assert err.value.code is ErrorCode.UNAVAILABLE and "restart the host" in err.value.message
    names = [n for n, _ in events]
    assert names.count("recovery_attempt_failed") == 2 and names[-1] == "device_failed"
    assert engine.state().reason and "device 0" in engine.state().reason  # type: ignore[operator]


def test_thermal_levels_throttle_pause_and_release(make) -> None:  # type: ignore[no-untyped-def]
    engine, sim, _ = make(max_active=2, throttle_delay=0.0)
    seen: list[tuple[str, dict]] = []
    health = HealthChecks(engine, sim, ThermalLimits(), lambda name, **f: seen.append((name, f)))
    for temperature, level in ((60, "normal"), (76, "warn"), (81, "throttle"), (79, "throttle"),
                               (86, "pause"), (80, "pause"), (74, "warn"), (71, "normal")):
        sim.set(0, temperature_c=temperature)
        health.check()
        assert health.thermal_labels()[0] == level, temperature
        if level == "throttle":
            assert engine.workers[0].thermal == ThermalLevel.THROTTLE
        if level == "pause":
            assert engine.state().state == "paused" and "too hot" in (engine.state().reason or "")
            held = Job(engine)
            time.sleep(0.3)
            assert engine.state().queue_depth == 1 and not held.streamed, "no job starts while too hot"
            held.handle.cancel()
    assert [n for n, _ in seen] == ["thermal_warn", "thermal_throttle", "thermal_pause", "thermal_warn",
                                    "thermal_normal"]
    assert seen[2][1] == {"device": 0, "temperature_c": 86, "previous": "throttle"}
    sample = engine.metrics.registry.get_sample_value
    assert sample("appliance_device_temperature_celsius", {"device": "0"}) == 71
    assert sample("appliance_device_thermal_level", {"device": "0"}) == 0


def test_throttling_runs_one_job_at_a_time(make) -> None:  # type: ignore[no-untyped-def]
    engine, _, _ = make(max_active=2, throttle_delay=0.01)
    engine.set_thermal(0, ThermalLevel.THROTTLE)
    jobs = [Job(engine, GenerationParams(max_tokens=6, temperature=0)) for _ in range(2)]
    peak = 0
    while not all(j.handle.wait(0) for j in jobs):
        peak = max(peak, engine.state().running)
        time.sleep(0.005)
    assert peak == 1 and all(isinstance(j.final, Done) for j in jobs)


def test_low_cmm_refuses_a_model_load_and_says_so(make) -> None:  # type: ignore[no-untyped-def]
    engine, sim, _ = make()
    sim.set(0, cmm_used_mib=7000.0)
    engine.reload("demo", timeout=30)
    reason = engine.workers[0].reason or ""
    assert "not enough CMM" in reason and "MiB free" in reason
    with pytest.raises(EngineError) as err:
        Job(engine)
    assert err.value.code is ErrorCode.UNAVAILABLE and "CMM" in err.value.message
    sim.set(0, cmm_used_mib=18.0)
    engine.reload("demo", timeout=60)
    job = Job(engine)
    assert job.handle.wait(60) and isinstance(job.final, Done)


def test_with_two_cards_a_dead_one_leaves_the_other_serving(demo_bundle_fp32: Path) -> None:
    sim = SimMonitor(reset_seconds=0.05)
    engine = Engine([ModelSpec("demo", "chat", demo_bundle_fp32, runtime="onnx")],
                    # A step of the demo model on a loaded 2-core machine can take most of a second.
                    config=EngineConfig(max_active=1, step_timeout=5.0), device_ids=(0, 1), monitor=sim,
                    recovery=RecoveryConfig(attempts=1, backoff=0.1))
    engine.start(timeout=120)
    try:
        sim.set(1, fault="dead")
        jobs = [Job(engine, GenerationParams(max_tokens=8, temperature=0)) for _ in range(4)]
        drive_watchdog(engine, lambda: all(j.handle.wait(0) for j in jobs))
        assert all(isinstance(j.final, Done) for j in jobs), "device 0 answers everything"
        assert engine.failed_devices.keys() == {1} and engine.state().state == "idle"
        assert "device 1" in (engine.state().reason or "")
    finally:
        engine.stop()
