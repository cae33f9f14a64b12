"""The scheduled health and telemetry jobs (APScheduler): thermal policy, watchdog, telemetry.

Health runs every few seconds: it reads each card, moves its thermal level (with hysteresis) and
tells the engine, starts a recovery for a card that stopped answering, and lets the engine's
watchdog look for a step that overran. Telemetry publishes what dashboards show. Both jobs catch
and log their own errors: a failing sensor must never stop the appliance.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from appliance.telemetry import STATE_FIGURES, TokenRate, build_telemetry, generated_tokens, headline_values
from appliance.topics import Topics
from npu.device.base import DeviceMonitor, DeviceReading
from npu.device.thermal import ThermalLevel, ThermalLimits, apply_thermal_policy
from npu.engine.engine import Engine

logger = logging.getLogger(__name__)

Publish = Callable[..., Any]
Event = Callable[..., None]


class HealthChecks:
    def __init__(self, engine: Engine, monitor: DeviceMonitor, limits: ThermalLimits, event: Event) -> None:
        self.engine = engine
        self.monitor = monitor
        self.limits = limits
        self.event = event
        self.levels: dict[int, ThermalLevel] = {}

    def device_ids(self) -> list[int]:
        return [d.device_id for d in self.engine.devices()]

    def check(self) -> list[DeviceReading]:
        readings = []
        for device in self.device_ids():
            reading = self.monitor.read(device)
            readings.append(reading)
            self.engine.record_reading(reading)
            self._thermal(reading)
            self.engine.metrics.record_reading(reading, int(self.levels.get(device, ThermalLevel.NORMAL)))
            if not reading.alive:
                self._dead(reading)
        self.engine.check_watchdog()
        return readings

    def _thermal(self, reading: DeviceReading) -> None:
        device = reading.device_id
        old = self.levels.get(device, ThermalLevel.NORMAL)
        new = apply_thermal_policy(old, reading.temperature_c, self.limits)
        if new == old:
            return
        self.levels[device] = new
        self.engine.set_thermal(device, new)
        log = logger.warning if new > old else logger.info
        log("device %d: %.1f C, thermal %s -> %s", device, reading.temperature_c or 0.0, old.label, new.label)
        self.event(f"thermal_{new.label}", device=device, temperature_c=reading.temperature_c,
                   previous=old.label)

    def _dead(self, reading: DeviceReading) -> None:
        device = reading.device_id
        snapshot = next((d for d in self.engine.devices() if d.device_id == device), None)
        if snapshot is None or snapshot.recovering or snapshot.failed is not None:
            return
        reason = reading.error or f"device {device} does not answer"
        self.engine.emit_event("device_dead", device=device, reason=reason)
        self.engine.recover_device(device, reason)

    def thermal_labels(self) -> dict[int, str]:
        return {d: self.levels.get(d, ThermalLevel.NORMAL).label for d in self.device_ids()}


class TelemetryJob:
    def __init__(self, engine: Engine, health: HealthChecks, publish: Publish, topics: Topics,
                 started_at: float) -> None:
        self.engine = engine
        self.health = health
        self.publish = publish
        self.topics = topics
        self.started_at = started_at
        self.rate = TokenRate(last_tokens=generated_tokens(engine))

    def run(self) -> dict[str, Any]:
        readings = [d.reading or self.health.monitor.read(d.device_id) for d in self.engine.devices()]
        payload = build_telemetry(self.engine, readings, self.health.thermal_labels(),
                                  self.rate.update(generated_tokens(self.engine)), self.started_at)
        self.publish(self.topics.telemetry, json.dumps(payload), qos=0, retain=True)
        for name, value in headline_values(payload).items():
            if name in STATE_FIGURES:
                continue  # published with every state change, from the state's own snapshot
            self.publish(self.topics.telemetry_metric(name), value, qos=0, retain=True)
        return payload


def guarded(name: str, job: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        started = time.monotonic()
        try:
            job()
        except Exception:
            logger.exception("%s job failed", name)
        elapsed = time.monotonic() - started
        if elapsed > 5:
            logger.warning("%s job took %.1f s", name, elapsed)

    return run


def make_scheduler(health: HealthChecks, telemetry: TelemetryJob, health_interval: float,
                   telemetry_interval: float) -> BackgroundScheduler:
    """Both jobs run at once on start, then on their intervals; a late run is merged, never stacked."""
    defaults = {"coalesce": True, "max_instances": 1, "misfire_grace_time": 30}
    scheduler = BackgroundScheduler(job_defaults=defaults)
    scheduler.add_job(guarded("health", health.check), "interval", seconds=health_interval, id="health",
                      next_run_time=datetime.now().astimezone())
    scheduler.add_job(guarded("telemetry", telemetry.run), "interval", seconds=telemetry_interval,
                      id="telemetry", next_run_time=datetime.now().astimezone())
    return scheduler
