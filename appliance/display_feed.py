"""The display pages' source: the display topics, read from the broker like any MQTT display.

A client of its own (``<client_id>-displays``, clean session, QoS 0: only the latest picture
matters, and the broker keeps it retained) subscribes to ``{base}/display/+`` (the pictures),
``{base}/display/+/meta`` (their descriptions) and ``{base}/display/+/preview`` (step previews)
and hands them to the HTTP bridge's ``DisplayBoard``. Reading the broker rather than the
appliance's own publishes means a page shows what every other display shows, whoever published
it, and the latest picture again after the appliance restarts. paho reconnects after a broker
restart and the subscriptions are made again on each connect.
"""

from __future__ import annotations

import json
import logging
import ssl
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from appliance.mqtt_link import MqttSettings
from appliance.topics import Topics
from bridge_http.displays import DisplayBoard

logger = logging.getLogger(__name__)


class DisplayFeed:
    def __init__(self, settings: MqttSettings, topics: Topics, board: DisplayBoard) -> None:
        self.settings = settings
        self.topics = topics
        self.board = board
        self.prefix = f"{topics.base}/display/"
        self._client: mqtt.Client | None = None

    def start(self) -> None:
        s = self.settings
        v5 = int(getattr(s, "protocol", 5)) == 5
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{s.client_id}-displays",
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            **({} if v5 else {"clean_session": True}),
        )
        if getattr(s, "username", None):
            client.username_pw_set(s.username, getattr(s, "password", None))
        tls = getattr(s, "tls", None)
        if tls is not None and getattr(tls, "enabled", False):
            client.tls_set(ca_certs=tls.ca_certs, certfile=tls.certfile, keyfile=tls.keyfile,
                           cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(bool(tls.insecure))
        client.reconnect_delay_set(1, 10)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        keepalive = int(getattr(s, "keepalive", 60) or 60)
        if v5:
            client.connect_async(s.host, int(s.port), keepalive, clean_start=True)
        else:
            client.connect_async(s.host, int(s.port), keepalive)
        client.loop_start()
        self._client = client

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            logger.error("display feed: MQTT connect refused: %s", reason_code)
            return
        parts = ("+", "+/meta", "+/preview")  # pictures, descriptions, step previews
        client.subscribe([(f"{self.prefix}{part}", 0) for part in parts])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.handle(msg.topic, bytes(msg.payload), _content_type(msg))
        except Exception:
            logger.exception("display feed: could not take a message on %s", msg.topic)

    def handle(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        if not topic.startswith(self.prefix) or not payload:
            return  # an empty retained message clears a display's topic: nothing to show
        name, _, part = topic[len(self.prefix):].partition("/")
        if part == "":
            if not self.board.show(name, payload, content_type):
                logger.warning("display %s: a message that is not a PNG, JPEG or WebP picture", name)
        elif part == "meta":
            try:
                meta = json.loads(payload)
            except ValueError:
                return
            if isinstance(meta, dict):
                self.board.describe(name, meta)
        elif part == "preview":
            self.board.preview(name, payload, content_type)


def _content_type(msg: mqtt.MQTTMessage) -> str | None:
    props = getattr(msg, "properties", None)
    value = getattr(props, "ContentType", None) if props is not None else None
    return str(value) if value else None
