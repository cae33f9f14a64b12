"""The console's live feed: the engine's state, events, cards, queue and the last hour, as SSE.

It listens to the engine (``add_state_listener``, ``add_event_listener``) and samples it every
``interval`` seconds on a thread of its own; every page that opens ``/console/events`` gets a
snapshot first (so a page that reconnects after a restart is whole again at once) and then each
change as it happens. The hour of history lives in memory only: it is for watching an
installation, not for records (``/metrics`` is for Prometheus).

Events pass through by name, whatever their fields: a new kind of event (a refusal, a queue
position) reaches the console's log without a change here.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from bridge_http.fanout import Fanout, Subscriber, sse
from npu.engine.api import EngineClient, EngineState

logger = logging.getLogger(__name__)

GENERATION_TOKENS = "appliance_generation_tokens"  # the engine's counter of generated tokens
HISTORY_SECONDS = 3600.0
QUEUE_EVERY = 1.0  # seconds between looks at running jobs' progress


def generated_tokens(engine: EngineClient) -> float:
    total = 0.0
    for metric in engine.registry.collect():
        if metric.name == GENERATION_TOKENS:
            total += sum(s.value for s in metric.samples if s.name.endswith("_total"))
    return total


class LiveFeed:
    def __init__(self, engine: EngineClient, interval: float = 5.0, log_size: int = 200) -> None:
        self.engine = engine
        self.interval = interval
        self.history: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=max(1, int(HISTORY_SECONDS / interval)))
        self.log: collections.deque[dict[str, Any]] = collections.deque(maxlen=log_size)
        self.recoveries: collections.Counter[int] = collections.Counter()
        self.fanout = Fanout()
        self._lock = threading.Lock()  # snapshot + subscribe vs. change + publish: nothing falls between
        self._state: EngineState | None = None
        self._started = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tokens: tuple[float, float] | None = None  # (monotonic time, tokens) of the last sample
        self._last_queue: list[dict[str, Any]] = []
        self._eta: float | None = None
        self._shown_queue: list[dict[str, Any]] | None = None  # what changed is sent, not the clock
        # Whether the appliance's MQTT link is up (``MqttLink.connected``); None: no MQTT here.
        self.mqtt_connected: Callable[[], bool] | None = None
        self._mqtt: bool | None = None

    # lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen to the engine and start sampling; idempotent (the first page starts it too)."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self.engine.add_state_listener(self._on_state)
        self.engine.add_event_listener(self._on_event)
        self._thread = threading.Thread(target=self._run, name="console-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.fanout.close()
        if self._thread is not None:
            self._thread.join(2)

    def _run(self) -> None:
        """A point of the charts every ``interval`` s; the queue every second while it moves."""
        next_sample = 0.0
        while True:
            try:
                if time.monotonic() >= next_sample:
                    next_sample = time.monotonic() + self.interval
                    self.sample()
                self.publish_queue()
                self.publish_mqtt()
            except Exception:
                logger.exception("console sample failed")
            if self._stop.wait(QUEUE_EVERY):
                return

    # what pages receive --------------------------------------------------------------------------
    def subscribe(self) -> Subscriber:
        self.start()
        with self._lock:
            return self.fanout.subscribe(self._snapshot_locked())

    def _snapshot_locked(self) -> list[str]:
        state = self._state or self.engine.state()
        return [
            sse("hello", {"models": [dataclasses.asdict(m) for m in self.engine.models()],
                          "interval": self.interval}),
            sse("state", dataclasses.asdict(state)),
            sse("devices", self.devices()),
            sse("history", list(self.history)),
            sse("log", list(self.log)),
            sse("queue", {"jobs": self._last_queue, "eta_s": self._eta}),
            sse("mqtt", {"connected": self._mqtt if self._mqtt is not None or self.mqtt_connected is None
                         else bool(self.mqtt_connected())}),
        ]

    def publish_mqtt(self) -> None:
        """The MQTT link's state when it changed (looked at every second), with an event in the log:
        ``mqtt_disconnected`` when the broker went away, ``mqtt_connected`` when it is back."""
        if self.mqtt_connected is None:
            return
        connected = bool(self.mqtt_connected())
        with self._lock:
            if connected == self._mqtt:
                return
            was, self._mqtt = self._mqtt, connected
            self._publish_locked("mqtt", {"connected": connected, "ts": round(time.time(), 3)})
        if was is not None:  # a change, not the first look
            self._on_event("mqtt_connected" if connected else "mqtt_disconnected", {})

    def publish_queue(self) -> None:
        """Every waiting and running job, sent when anything about them changed."""
        jobs = [dataclasses.asdict(job) for job in self.engine.jobs()]
        eta = self.engine.queue().eta_s  # when a request sent now would start, from measured figures
        shown = [{k: v for k, v in job.items() if k != "waited_s"} for job in jobs] + [{"eta_s": eta}]
        with self._lock:
            if shown == self._shown_queue:
                return
            self._shown_queue, self._last_queue, self._eta = shown, jobs, eta
            self._publish_locked("queue", {"jobs": jobs, "eta_s": eta})

    def devices(self) -> list[dict[str, Any]]:
        cards = []
        for device in self.engine.devices():
            reading = device.reading.as_dict() if device.reading is not None else {}
            cards.append({
                **reading, "device_id": device.device_id, "thermal": device.thermal,
                "recovering": device.recovering, "failed": device.failed, "loaded": device.loaded,
                "recoveries": self.recoveries[device.device_id],
            })
        return cards

    def _publish_locked(self, event: str, data: Any) -> None:
        self.fanout.publish(sse(event, data))

    # engine listeners (engine threads) --------------------------------------------------------
    def _on_state(self, state: EngineState) -> None:
        cards = self.devices()  # a recovery's end, a card too hot: the cards change with the state
        with self._lock:
            self._state = state
            self._publish_locked("state", {**dataclasses.asdict(state), "ts": round(time.time(), 3)})
            self._publish_locked("devices", cards)
        self.publish_queue()  # a job came, started or ended

    def _on_event(self, name: str, fields: dict[str, Any]) -> None:
        entry = {"event": name, "ts": round(time.time(), 3), **fields}
        with self._lock:
            if name == "recovery_started" and isinstance(fields.get("device"), int):
                self.recoveries[fields["device"]] += 1
            self.log.append(entry)
            self._publish_locked("event", entry)
        if "device" in fields:
            self.publish_devices()

    def publish_devices(self) -> None:
        cards = self.devices()
        with self._lock:
            self._publish_locked("devices", cards)

    def sample(self) -> dict[str, Any]:
        """One point of the hour's charts, and the cards as they are now."""
        now, tokens = time.monotonic(), generated_tokens(self.engine)
        rate = None
        if self._tokens is not None and now > self._tokens[0]:
            rate = round(max(0.0, tokens - self._tokens[1]) / (now - self._tokens[0]), 2)
        self._tokens = (now, tokens)
        state = self.engine.state()
        cards = self.devices()
        temps = [c["temperature_c"] for c in cards if c.get("temperature_c") is not None]
        point = {"ts": round(time.time(), 1), "tokens_per_s": rate, "queue_depth": state.queue_depth,
                 "running": state.running, "temperature_c": max(temps) if temps else None}
        with self._lock:
            self.history.append(point)
            self._publish_locked("sample", point)
            self._publish_locked("devices", cards)
        return point

    def publish(self, event: str, data: Any) -> None:
        """Anything else a page should see (the queue, a job's progress), from any thread."""
        with self._lock:
            self._publish_locked(event, data)
