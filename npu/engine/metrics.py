"""The engine's Prometheus metrics, one registry per engine, named in the style of vLLM.

Both front doors share the engine, so what is counted here covers MQTT and HTTP alike. The
registry is the engine's own (not prometheus-client's global one), so several engines in one
process, as in the tests, never collide; ``/metrics`` serves it and the telemetry job reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from npu.device.base import DeviceReading

PREFIX = "appliance"

# Seconds; fine at the low end where the NPU lives, up to the request timeout at the top.
TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 240.0)


class EngineMetrics:
    """Counters and histograms the workers feed; gauges read live from the engine."""

    def __init__(self, queue_depth: Callable[[], int], running: Callable[[], int]) -> None:
        # The *_created series only double what dashboards scrape.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        model = ("model_name",)
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens processed", model, registry=r
        )
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Tokens generated", model, registry=r
        )
        self.cached_tokens = Counter(
            f"{PREFIX}_prefix_cache_hit_tokens", "Prompt tokens reused from the KV cache", model, registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From submission to the first generated token",
            model, buckets=TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Between consecutive generated tokens",
            model, buckets=ITL_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "From submission to the last token",
            model, buckets=E2E_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            f"{PREFIX}_request_queue_time_seconds", "Time a job waited before it started",
            model, buckets=E2E_BUCKETS, registry=r,
        )
        self.success = Counter(
            f"{PREFIX}_request_success", "Jobs finished, by finish reason",
            ("model_name", "finished_reason"), registry=r,
        )
        self.failure = Counter(
            f"{PREFIX}_request_failure", "Accepted jobs that ended in an error, by error code",
            ("code",), registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_request_rejected", "Jobs refused at submission, by error code (busy: queue full)",
            ("code",), registry=r,
        )
        self.audio_seconds = Counter(
            f"{PREFIX}_audio_seconds", "Seconds of speech synthesised (tts) or transcribed (stt)",
            model, registry=r,
        )
        self.realtime_factor = Histogram(
            f"{PREFIX}_audio_realtime_factor", "Compute time over audio duration of a speech job",
            model, buckets=RTF_BUCKETS, registry=r,
        )
        Gauge(f"{PREFIX}_num_requests_waiting", "Jobs waiting in the queue", registry=r).set_function(
            queue_depth
        )
        Gauge(f"{PREFIX}_num_requests_running", "Jobs being generated", registry=r).set_function(running)
        self._models: dict[str, ModelMetrics] = {}
        device = ("device",)
        self.device_temperature = Gauge(
            f"{PREFIX}_device_temperature_celsius", "NPU card temperature", device, registry=r
        )
        self.device_cmm_free = Gauge(
            f"{PREFIX}_device_cmm_free_mib", "Free CMM (model and buffer memory)", device, registry=r
        )
        self.device_npu_load = Gauge(f"{PREFIX}_device_npu_load_percent", "NPU load", device, registry=r)
        self.device_mem_used = Gauge(
            f"{PREFIX}_device_memory_used_mib", "Card system memory in use", device, registry=r
        )
        self.device_alive = Gauge(f"{PREFIX}_device_alive", "1 while the card answers", device, registry=r)
        self.device_thermal = Gauge(
            f"{PREFIX}_device_thermal_level", "0 normal, 1 warn, 2 throttle, 3 pause", device, registry=r
        )
        self.recoveries = Counter(
            f"{PREFIX}_device_recoveries", "Device recoveries, by outcome", ("device", "outcome"), registry=r
        )

    def record_reading(self, reading: DeviceReading, thermal_level: int) -> None:
        """Set the device gauges; an unknown value is exported as NaN, not as a stale number."""
        device = str(reading.device_id)
        for gauge, value in (
            (self.device_temperature, reading.temperature_c),
            (self.device_cmm_free, reading.cmm_free_mib),
            (self.device_npu_load, reading.npu_load_pct),
            (self.device_mem_used, reading.mem_used_mib),
        ):
            gauge.labels(device).set(float("nan") if value is None else value)
        self.device_alive.labels(device).set(1 if reading.alive else 0)
        self.device_thermal.labels(device).set(thermal_level)

    def for_model(self, model_id: str) -> ModelMetrics:
        """The per-model children, resolved once per job instead of once per token."""
        children = self._models.get(model_id)
        if children is None:
            children = self._models[model_id] = ModelMetrics(
                prompt_tokens=self.prompt_tokens.labels(model_id),
                generation_tokens=self.generation_tokens.labels(model_id),
                cached_tokens=self.cached_tokens.labels(model_id),
                ttft=self.ttft.labels(model_id),
                itl=self.itl.labels(model_id),
                e2e=self.e2e.labels(model_id),
                queue_time=self.queue_time.labels(model_id),
            )
        return children


@dataclass(frozen=True)
class ModelMetrics:
    prompt_tokens: Counter
    generation_tokens: Counter
    cached_tokens: Counter
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue_time: Histogram
