"""Pure parts of health and telemetry: thermal policy, recovery pauses, telemetry, sd_notify, sim card."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance import sd_notify
from appliance.telemetry import TokenRate, headline_values, summarise
from npu.device.base import DeviceFault, DeviceReading, DeviceResetError
from npu.device.sim import SimEvent, SimMonitor, SimState
from npu.device.thermal import ThermalLevel, ThermalLimits, apply_thermal_policy
from npu.engine.recovery import RecoveryConfig, recovery_delays

LIMITS = ThermalLimits(warn_c=75, throttle_c=80, pause_c=85, hysteresis_c=3)
L = ThermalLevel


@pytest.mark.parametrize(
    ("level", "temperature", "expected"),
    [
        (L.NORMAL, 74.9, L.NORMAL), (L.NORMAL, 75, L.WARN), (L.NORMAL, 80, L.THROTTLE),
        (L.NORMAL, 85, L.PAUSE), (L.WARN, 73, L.WARN), (L.WARN, 72, L.NORMAL),
        (L.THROTTLE, 78, L.THROTTLE), (L.THROTTLE, 77, L.WARN), (L.THROTTLE, 70, L.NORMAL),
        (L.PAUSE, 84, L.PAUSE), (L.PAUSE, 75, L.PAUSE), (L.PAUSE, 74, L.WARN), (L.PAUSE, 60, L.NORMAL),
        (L.THROTTLE, None, L.THROTTLE),
    ],
)
def test_thermal_policy_with_hysteresis(level: ThermalLevel, temperature: float | None,
                                        expected: ThermalLevel) -> None:
    assert apply_thermal_policy(level, temperature, LIMITS) == expected


@given(st.lists(st.floats(20, 110), min_size=1, max_size=40))
def test_thermal_levels_always_cover_the_temperature(temperatures: list[float]) -> None:
    """Whatever the history, the level is never below what the temperature alone demands."""
    level = L.NORMAL
    for t in temperatures:
        level = apply_thermal_policy(level, t, LIMITS)
        floor = apply_thermal_policy(L.NORMAL, t, LIMITS)
        assert level >= floor
        assert level != L.PAUSE or t >= LIMITS.warn_c


def test_thermal_limits_must_rise() -> None:
    with pytest.raises(ValueError):
        ThermalLimits(warn_c=80, throttle_c=80, pause_c=85)


def test_recovery_pauses_double_up_to_the_cap() -> None:
    assert recovery_delays(RecoveryConfig(attempts=5, backoff=2, backoff_max=6)) == [0, 2, 4, 6, 6]
    assert recovery_delays(RecoveryConfig(attempts=1)) == [0]


def test_token_rate_over_the_interval() -> None:
    rate = TokenRate(last_tokens=100, last_at=10.0)
    assert rate.update(150, now=20.0) == 5.0
    assert rate.update(150, now=30.0) == 0.0


def test_summary_and_headline_skip_unknown_values() -> None:
    readings = [
        DeviceReading(0, "sim", temperature_c=61.0, cmm_total_mib=7040, cmm_used_mib=1040, npu_load_pct=50),
        DeviceReading(1, "sim", temperature_c=70.0, cmm_total_mib=7040, cmm_used_mib=40, npu_load_pct=10),
    ]
    assert summarise(readings) == {"temperature_c": 70.0, "cmm_free_mib": 6000.0, "npu_load_pct": 30.0}
    assert summarise([DeviceReading(0, "host")]) == {"temperature_c": None, "cmm_free_mib": None,
                                                      "npu_load_pct": None}
    assert headline_values({"temperature_c": None, "queue_depth": 3, "tokens_per_s": 12.5}) == {
        "queue_depth": "3", "tokens_per_s": "12.5"}


def test_sd_notify_sends_datagrams_only_under_systemd(tmp_path: Path) -> None:
    assert sd_notify.notify("READY=1", env={}) is False
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        assert sd_notify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": path})
        assert server.recv(64) == b"WATCHDOG=1"
    assert sd_notify.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert sd_notify.watchdog_interval({}) is None
    assert sd_notify.watchdog_interval({"WATCHDOG_USEC": "x"}) is None


def test_sim_card_faults_strike_where_a_real_card_fails() -> None:
    sim = SimMonitor(SimState(temperature_c=40), reset_seconds=0)
    sim.before_step(0)  # healthy: nothing happens
    sim.set(0, fault="reset")
    with pytest.raises(DeviceFault):
        sim.before_step(0)
    sim.before_step(0)  # a reset strikes once
    sim.set(0, fault="hang")
    errors: list[Exception] = []

    def step() -> None:
        try:
            sim.before_step(0)
        except DeviceFault as exc:
            errors.append(exc)

    hung = threading.Thread(target=step)
    hung.start()
    hung.join(0.2)
    assert hung.is_alive(), "a hang blocks the step"
    sim.reset(0)
    hung.join(2)
    assert not hung.is_alive() and errors, "the reset ends the hung step with a fault"
    sim.set(0, fault="dead")
    assert not sim.read(0).alive and sim.read(0).temperature_c is None
    with pytest.raises(DeviceResetError):
        sim.reset(0)
    sim.set(0, fault="none")
    assert sim.read(0).alive and sim.resets(0) == 1


def test_sim_script_plays_timed_events() -> None:
    sim = SimMonitor(SimState(temperature_c=40), [SimEvent(at=0.0, temperature_c=90, cmm_used_mib=100)])
    reading = sim.read(0)
    assert reading.temperature_c == 90 and reading.cmm_free_mib == 7040 - 100
