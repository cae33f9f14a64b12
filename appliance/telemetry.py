"""The telemetry message: device readings and engine figures, as dashboards read them.

``{base}/telemetry`` carries the whole JSON; ``{base}/telemetry/<metric>`` carries each headline
figure as a bare number (what Node-RED gauges and Home Assistant sensors want). Both are retained,
so a dashboard that connects later shows the last values at once. The queue figures
(``STATE_FIGURES``) go out with every state change instead, from the same snapshot as
``{base}/state``, so a dashboard never shows a queue that disagrees with the state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from npu.device.base import DeviceReading
from npu.engine.api import EngineClient, EngineState

HEADLINE = ("temperature_c", "cmm_free_mib", "npu_load_pct", "queue_depth", "running", "tokens_per_s",
            "requests", "errors", "uptime_s")
STATE_FIGURES = ("queue_depth", "running")  # published with {base}/state, not on the telemetry interval
GENERATION_TOKENS = "appliance_generation_tokens"  # the engine's counter, per model
AUDIO_SECONDS = "appliance_audio_seconds"  # speech synthesised or transcribed, per model


@dataclass
class TokenRate:
    """Tokens per second over the last interval, from the engine's generated-token counter."""

    last_tokens: float = 0.0
    last_at: float = field(default_factory=time.monotonic)

    def update(self, tokens_total: float, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        elapsed = now - self.last_at
        rate = (tokens_total - self.last_tokens) / elapsed if elapsed > 0 else 0.0
        self.last_tokens, self.last_at = tokens_total, now
        return max(0.0, rate)


def generated_tokens(engine: EngineClient) -> float:
    """Every model's generated tokens so far, from the engine's Prometheus registry."""
    return counted(engine, GENERATION_TOKENS)


def counted(engine: EngineClient, name: str) -> float:
    """A counter of the engine's registry, summed over its models."""
    total = 0.0
    for metric in engine.registry.collect():
        if metric.name == name:
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


def summarise(readings: list[DeviceReading]) -> dict[str, float | None]:
    """Headline device figures across cards: the hottest, the least free memory, the mean load."""
    temps = [r.temperature_c for r in readings if r.temperature_c is not None]
    free = [r.cmm_free_mib for r in readings if r.cmm_free_mib is not None]
    loads = [r.npu_load_pct for r in readings if r.npu_load_pct is not None]
    return {
        "temperature_c": max(temps) if temps else None,
        "cmm_free_mib": min(free) if free else None,
        "npu_load_pct": round(sum(loads) / len(loads), 1) if loads else None,
    }


def build_telemetry(
    engine: EngineClient, readings: list[DeviceReading], thermal: dict[int, str], tokens_per_s: float,
    started_at: float, now: float | None = None,
) -> dict[str, Any]:
    now = time.time() if now is None else now
    state = engine.state()
    return {
        "ts": round(now, 3),
        "uptime_s": round(now - started_at, 1),
        "state": state.state,
        "queue_depth": state.queue_depth,
        "running": state.running,
        "tokens_per_s": round(tokens_per_s, 2),
        "requests": engine.jobs_done + engine.jobs_failed,
        "errors": engine.jobs_failed,
        "audio_s": round(counted(engine, AUDIO_SECONDS), 1),  # seconds of speech spoken and heard
        **summarise(readings),
        "devices": [{**r.as_dict(), "thermal": thermal.get(r.device_id, "normal")} for r in readings],
        "senders": engine.senders(),
    }


def state_figures(state: EngineState) -> dict[str, str]:
    """The bare queue figures of one state snapshot, published with it."""
    return {name: str(getattr(state, name)) for name in STATE_FIGURES}


def headline_values(payload: dict[str, Any]) -> dict[str, str]:
    """The bare-number topics: only figures that are known."""
    out = {}
    for name in HEADLINE:
        value = payload.get(name)
        if value is not None:
            out[name] = f"{value:g}" if isinstance(value, float) else str(value)
    return out
