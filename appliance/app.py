"""The resident process: start the pieces in order, stop them in reverse.

Start: MQTT link (online, info, state ``loading``) -> engine (models loading) -> HTTP bridge ->
health and telemetry jobs -> request dispatcher, once the models are loaded. Requests that arrive
meanwhile, including prompts the broker kept while the appliance was down, wait in the inbound
queue instead of being refused. Stop (SIGTERM, SIGINT): the jobs stop, the engine answers every
waiting job, the bridge and the dispatcher drain, and the link publishes ``stopped`` before
disconnecting. One stop event is shared by the main loop, which also pings systemd's watchdog.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from appliance import sd_notify
from appliance.config import ApplianceConfig
from appliance.device_monitor import make_device_monitor
from appliance.display_feed import DisplayFeed
from appliance.gate import door_engine, make_gate
from appliance.ha_discovery import build_discovery, clear_discovery, discovery_changed
from appliance.health import HealthChecks, TelemetryJob, guarded, make_scheduler
from appliance.journal import Journal
from appliance.mqtt_link import InboundMessage, MqttLink
from appliance.ready import http_base_url, ready_message
from appliance.scenes import Scenes
from appliance.telemetry import state_figures
from appliance.topics import Topics
from appliance.wyoming_server import WyomingServer, WyomingSettings
from bridge_http.app import create_app
from bridge_http.auth import exposure_warning
from bridge_http.bridge import BridgeSettings
from bridge_http.server import HttpServer, HttpServerError
from bridge_http.ui import UI
from handlers.acceptance import Replayed
from handlers.context import HandlerContext, Limits
from handlers.image import image_meta, publish_curtain
from handlers.registry import Dispatcher
from handlers.reply import publish_all
from handlers.speech import Listening
from npu.device.sim import SimMonitor
from npu.engine.api import EngineState, ImagePreview, ImageResult
from npu.engine.engine import Engine

logger = logging.getLogger(__name__)


def app_version() -> str:
    try:
        return version("appliance")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


class Appliance:
    """The wired process; ``start()`` and ``stop()`` read as ordered lists of steps."""

    def __init__(self, config: ApplianceConfig) -> None:
        self.config = config
        self.topics = Topics(config.mqtt.base_topic, config.mqtt.shared_group)
        self.stop_event = threading.Event()
        self.started_at = time.time()
        self.monitor = make_device_monitor(config)
        self.engine = Engine(config.model_specs(), config=config.engine_settings(),
                             device_ids=config.device.ids, monitor=self.monitor,
                             recovery=config.recovery_settings(), personas=config.engine_personas())
        # Thermal events go through the engine's listeners: MQTT and the console both hear them.
        self.health = HealthChecks(self.engine, self.monitor, config.thermal_limits(), self.engine.emit_event)
        self.inbound: queue.Queue[InboundMessage] = queue.Queue()
        ha = config.homeassistant.enabled
        self._discovery: dict[str, Any] | None = None
        self._discovery_lock = threading.Lock()  # the connect thread and the dispatcher both send it
        # The picture entity's content type follows the display's latest picture (its retained meta).
        has_image_model = any(m.kind == "image" for m in config.models)
        self._picture_display = config.images.display if has_image_model else None
        self._picture_type = "image/jpeg" if config.images.format == "jpeg" else "image/png"
        side: dict[str, Callable[[bytes], None]] = {}
        if ha:
            side[self.topics.ha_status] = self._on_ha_status
            if self._picture_display is not None:
                side[self.topics.display_meta(self._picture_display)] = self._on_picture_meta
        self.link = MqttLink(
            config.mqtt, self.inbound, topics=self.topics, on_connected=self.publish_retained,
            extra_topics=(*side, self.topics.listen_filter),
        )
        self.journal: Journal | None = None
        self._queue_sent: dict[str, Any] | None = None  # the last {base}/queue, sent again only changed
        if config.journal.enabled:
            self.journal = Journal(config.journal_path(), sync=config.journal.sync,
                                   window=config.journal.dedup_window)
        self.scenes = Scenes(config.scenes, self.engine, self.link.publish, self.topics,
                             self.engine.emit_event)
        # The prompt gate: MQTT's handlers screen before they submit; HTTP's engine screens in submit.
        self.gate = make_gate(config, self.engine.emit_event, self.engine.registry)
        context = HandlerContext(
            self.engine, self.link.publish, self.topics, Limits(max_payload=config.mqtt.max_payload),
            images=config.image_defaults(),
            sim=self.monitor if isinstance(self.monitor, SimMonitor) else None,
            journal=self.journal,
            moderation=None if "mqtt" in config.moderation.trusted else self.gate,
            scenes=self.scenes,
        )
        self.telemetry = TelemetryJob(
            self.engine, self.health, self.link.publish, self.topics, self.started_at
        )
        self.scheduler = make_scheduler(self.health, self.telemetry, config.device.health_interval,
                                        config.telemetry.interval)
        self.scenes.register(self.scheduler)  # each scene's start as a cron job
        self.listening = Listening(context, config.voice.listen_idle)  # {base}/listen/<node>/...
        self.scheduler.add_job(guarded("listen", self.listening.drop_idle), "interval", id="listen-idle",
                               seconds=self.listening.sweep_s)  # a node that went away sends nothing
        wyoming = config.voice.wyoming
        trusted = self.trusted_doors(config)
        self.wyoming = WyomingServer(door_engine(self.engine, self.gate, "wyoming", trusted), WyomingSettings(
            host=wyoming.host, asr_port=wyoming.asr_port, tts_port=wyoming.tts_port,
            zeroconf=wyoming.zeroconf, name=self.topics.base), app_version()) if wyoming.enabled else None
        self.dispatcher = Dispatcher(self.inbound, context, side_topics=side, streams=self._on_listen)
        self.http: HttpServer | None = None
        self.ui: UI | None = None
        self.display_feed: DisplayFeed | None = None
        if config.http.enabled:
            settings = BridgeSettings(api_key=config.http.api_key, max_n=config.http.max_n,
                                      max_body=config.http.max_body,
                                      cors_origins=tuple(config.http.cors_origins),
                                      image_url_ttl=config.images.url_ttl,
                                      raw_prompt_special_tokens=config.http.raw_prompt_special_tokens,
                                      sender=config.http.sender)
            http_app = create_app(door_engine(self.engine, self.gate, "http", trusted), settings)
            self.ui = http_app.state.ui
            self.ui.engine = door_engine(self.engine, self.gate, "console", trusted)  # its image box
            self.ui.engine_for = lambda display: door_engine(self.engine, self.gate, "console", trusted,
                                                             display)
            self.ui.curtain_out = self.curtain_on_display
            self.ui.display_out = self.show_on_display  # a console picture goes to the display's topic
            self.ui.preview_out = self.preview_on_display
            self.display_feed = DisplayFeed(config.mqtt, self.topics, self.ui.displays)
            self.http = HttpServer(http_app, config.http.host, config.http.port)

    @staticmethod
    def trusted_doors(config: ApplianceConfig) -> set[str]:
        """The front doors the gate lets through unscreened (``moderation.trusted``); the console only
        behind ``http.api_key``, since without one anyone on the network can use it."""
        trusted = set(config.moderation.trusted)
        if "console" in trusted and not config.http.api_key:
            logger.warning("moderation.trusted lists the console but http.api_key is not set: "
                           "the console's prompts are screened like everyone's")
            trusted.discard("console")
        return trusted

    def start(self) -> None:
        logger.info("appliance %s starting (base topic %r)", app_version(), self.topics.base)
        http_error = self._start_http()  # first, so the retained info sent on connect names the port
        self.engine.add_state_listener(self.publish_state)  # before the link: its connect sends the state
        self.link.start()
        if http_error:
            self.event("http_failed", error=http_error)
        elif self.ui is not None and self.display_feed is not None:
            self.ui.live.mqtt_connected = self.link.connected.is_set  # the console shows the broker link
            self.ui.live.start()  # the console's hour of charts starts now, not when a page opens
            self.display_feed.start()
        self.engine.add_event_listener(lambda name, fields: self.event(name, **fields))
        self.engine.start(wait_loaded=False)
        self.scenes.start()  # the scene in force by the schedule, before any request is taken
        self._start_wyoming()
        self.scheduler.start()
        self._ready = threading.Thread(target=self._when_loaded, name="when-loaded", daemon=True)
        self._ready.start()

    def stop(self) -> None:
        logger.info("appliance stopping")
        self.stop_event.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.journal is not None:
            self.journal.begin_stop()  # what the stop refuses stays accepted, for the next start
        if self.wyoming is not None:
            self.wyoming.stop()
        self.engine.stop()
        if self.ui is not None:  # the pages' streams end cleanly, so the bridge stops at once
            self.ui.live.stop()
            self.ui.displays.close()
        if self.http is not None:
            self.http.stop()
        if self.display_feed is not None:
            self.display_feed.stop()
        self.dispatcher.stop()
        self.link.stop("stopped")
        if self.journal is not None:
            self.journal.close()
        self.monitor.close()

    def _start_http(self) -> str | None:
        """The bridge serves /health at once (503 while loading); if it cannot listen, MQTT goes on."""
        if self.http is None:
            return None
        warning = exposure_warning(self.config.http.host, self.config.http.api_key)
        if warning:
            logger.warning(warning)
        try:
            self.http.start()
        except HttpServerError as exc:
            logger.error("%s; MQTT requests are still served", exc)
            self.http = None
            return str(exc)
        return None

    def _when_loaded(self) -> None:
        while not self.engine.wait_loaded(0.5):
            if self.stop_event.is_set():
                return
        self.dispatcher.start(first=self._from_journal())
        self.publish_retained()
        for model in self.engine.models():
            self.engine.emit_event(  # through the engine: MQTT and the console's log hear it
                "model_loaded" if model.loaded else "model_failed", model=model.id, backend=model.backend
            )
        self._say_ready()

    def _say_ready(self) -> None:
        """Log the ready line once the broker took the subscriptions (models are loaded by now)."""
        mqtt = self.config.mqtt
        if not self.link.subscribed.wait(2):
            logger.info("models loaded; waiting for the MQTT broker at %s:%d", mqtt.host, mqtt.port)
        while not self.link.subscribed.wait(0.5):
            if self.stop_event.is_set():
                return
        url = http_base_url(self.config.http.host, self.http.bound_port) if self.http is not None else None
        note = "did not start (see above)" if self.config.http.enabled else "off (http.enabled: false)"
        models = [f"{m.id} ({m.backend})" for m in self.engine.models() if m.loaded]
        logger.info(ready_message(self.topics, f"{mqtt.host}:{mqtt.port}", models, url, note))

    def _from_journal(self) -> list[InboundMessage]:
        """What the last run accepted and did not finish: replies to send again, requests to run.

        Requests keep their original receipt time, so one whose deadline passed while the
        appliance was down is answered ``expired`` instead of generated.
        """
        if self.journal is None:
            return []
        for item in self.journal.undelivered():
            publish_all(self.link.publish, item.messages, self.journal, item.seq)
        replays = []
        now_wall, now_mono = time.time(), time.monotonic()
        for row in self.journal.unanswered():
            r = row.request
            replays.append(InboundMessage(
                topic=r.topic, payload=r.payload, response_topic=r.response_topic,
                correlation_data=r.correlation_data, message_expiry=r.message_expiry,
                received_at=now_mono - max(0.0, now_wall - r.received), qos=r.qos,
                replayed=Replayed(row.seq, r.request_id),
            ))
        if replays:
            logger.info("answering %d request(s) accepted before the restart", len(replays))
        return replays

    # retained state ---------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        http = self.config.http
        return {
            "version": app_version(),
            "base_topic": self.topics.base,
            "models": [asdict(m) for m in self.engine.models()],
            "device": {"backend": self.config.device.backend, "monitor": self.monitor.name,
                       "ids": self.config.device.ids},
            "limits": {
                "queue_max": self.config.engine.queue_max,
                "request_timeout": self.config.engine.request_timeout,
                "max_payload": self.config.mqtt.max_payload,
            },
            "http": f"http://{http.host}:{self.http.bound_port}/v1" if self.http is not None else None,
            "started": int(self.started_at),
        }

    def publish_retained(self) -> None:
        self.link.publish(self.topics.info, json.dumps(self.info()), qos=1, retain=True)
        self.engine.notify_state(force=True)  # through the engine, in order with every other change
        if self.scenes.current is not None:
            self.link.publish(self.topics.scene, json.dumps(self.scenes.payload()), qos=1, retain=True)
        self.publish_discovery()

    def publish_discovery(self, force: bool = False) -> None:
        """Home Assistant's device config, retained; sent again only when it changed or HA restarted.

        With discovery turned off, an empty retained config, once per start: HA removes the device.
        """
        with self._discovery_lock:
            if not self.config.homeassistant.enabled:
                if self._discovery is None:
                    topic, empty = clear_discovery(self.topics)
                    self.link.publish(topic, empty, qos=1, retain=True)
                    self._discovery = {}
                return
            topic, payload = build_discovery(self.topics, version=app_version(),
                                             model_ids=[m.id for m in self.config.models],
                                             name=self.config.homeassistant.name,
                                             display=self._picture_display, image_type=self._picture_type,
                                             scenes=self.scenes.names() or None)
            if force or discovery_changed(self._discovery, payload):
                self.link.publish(topic, json.dumps(payload), qos=1, retain=True)
                self._discovery = payload

    def _start_wyoming(self) -> None:
        """Home Assistant's speech servers; one that cannot listen is logged, the rest goes on."""
        if self.wyoming is None:
            return
        try:
            self.wyoming.start()
        except Exception as exc:
            logger.error("the Wyoming servers did not start: %s; MQTT and HTTP are still served", exc)
            self.wyoming = None

    def _on_listen(self, msg: InboundMessage) -> bool:
        parsed = self.topics.parse_listen(msg.topic)
        if parsed is None:
            return False
        self.listening.on_message(*parsed, bytes(msg.payload), msg.response_topic, msg.correlation_data)
        return True

    def _on_ha_status(self, payload: bytes) -> None:
        """HA's birth message: it (re)started and asks every device to announce itself."""
        if payload.strip() == self.config.homeassistant.birth_payload.encode().strip():
            self.publish_discovery(force=True)

    def _on_picture_meta(self, payload: bytes) -> None:
        """A new picture on the default display: the picture entity takes its content type."""
        try:
            content_type = json.loads(payload).get("content_type")
        except (ValueError, AttributeError):
            return
        if content_type in ("image/png", "image/jpeg") and content_type != self._picture_type:
            self._picture_type = content_type
            self.publish_discovery()

    def publish_state(self, state: EngineState) -> None:
        """The engine's state listener: ``{base}/state`` and the bare queue figures of the same snapshot."""
        payload = {**asdict(state), "ts": round(time.time(), 3)}
        self.link.publish(self.topics.state, json.dumps(payload), qos=1, retain=True)
        for name, value in state_figures(state).items():
            self.link.publish(self.topics.telemetry_metric(name), value, qos=0, retain=True)
        self.publish_queue(state)

    def publish_queue(self, state: EngineState | None = None) -> None:
        """``{base}/queue``, retained: its length and when a request sent now would start; sent when
        it changed (the state listener calls this on every change of the queue). Its length and
        running jobs are those of the state snapshot ``{base}/state`` carries, so the two agree."""
        info = self.engine.queue()
        length, running = (info.length, info.running) if state is None else (state.queue_depth, state.running)
        payload = {"length": length, "running": running, "queue_max": info.queue_max,
                   "eta_s": info.eta_s}
        if payload != self._queue_sent:
            self._queue_sent = payload
            self.link.publish(self.topics.queue, json.dumps({**payload, "ts": round(time.time(), 3)}),
                              qos=1, retain=True)

    def show_on_display(self, display: str, prompt: str, result: ImageResult) -> None:
        """A picture made from the console, on its display's topics as an MQTT request's would be."""
        out = result.output
        self.link.publish(self.topics.display(display), out.data, qos=1, retain=True,
                          properties={"content_type": out.content_type})
        self.link.publish(self.topics.display_meta(display), image_meta("console", prompt, result, display),
                          qos=1, retain=True, properties={"content_type": "application/json"})

    def curtain_on_display(self, display: str, request_id: str) -> None:
        """A console picture the gate refused: its display shows the curtain, as for MQTT."""
        if self.gate is not None:
            publish_curtain(self.link.publish, self.topics, self.gate, display, request_id)

    def preview_on_display(self, display: str, preview: ImagePreview) -> None:
        """A console picture's step preview, on its display's preview topic (not retained)."""
        self.link.publish(self.topics.display_preview(display), preview.data, qos=0, retain=False,
                          properties={"content_type": preview.content_type})

    def event(self, name: str, **fields: Any) -> None:
        payload = {"event": name, "ts": round(time.time(), 3), **fields}
        self.link.publish(self.topics.event, json.dumps(payload), qos=1, retain=False)


def run(config: ApplianceConfig) -> int:
    """Run until SIGTERM or SIGINT."""
    app = Appliance(config)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: app.stop_event.set())
    app.start()
    sd_notify.notify("READY=1")
    ping = sd_notify.watchdog_interval()
    try:
        while not app.stop_event.wait(min(1.0, ping or 1.0)):
            if ping:
                sd_notify.notify("WATCHDOG=1")
    finally:
        sd_notify.notify("STOPPING=1")
        app.stop()
    return 0
