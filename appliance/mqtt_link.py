"""The MQTT link: one paho-mqtt client behind a small start/publish/stop interface.

Why a wrapper: the rest of the process must not care about paho's callbacks, reconnects or MQTT
versions. The link keeps a persistent session (prompts published while the appliance restarts are
delivered when it returns), announces availability on ``{base}/status`` (Last Will ``offline``,
``online`` on every connect, ``stopped`` on a clean stop), subscribes in ``on_connect`` so a
reconnect resubscribes, and hands every inbound message to the application as an immutable
``InboundMessage`` on a queue. The paho network thread never runs handlers; it only enqueues.

Acknowledgements are manual: a QoS 1 or 2 request is acknowledged to the broker only when the
application calls ``InboundMessage.ack`` (after journaling or answering it), so until then the
broker keeps it and delivers it again after a crash. ``publish(..., on_delivered=...)`` calls back
when the broker has acknowledged a QoS 1 message, which marks a journaled reply delivered.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.topics import Topics
from handlers.inbound import InboundMessage

logger = logging.getLogger(__name__)

Payload = str | bytes | bytearray | Mapping[str, Any] | list[Any] | int | float | None
# Publish properties, paho-free so handlers can pass them: correlation_data, response_topic,
# content_type, message_expiry (seconds), user_properties (list of (key, value)).
PublishProperties = Mapping[str, Any]


class TlsSettings(Protocol):
    enabled: bool
    ca_certs: str | None
    certfile: str | None
    keyfile: str | None
    insecure: bool


class MqttSettings(Protocol):
    """The fields of ``ApplianceConfig.mqtt`` the link reads (duck-typed)."""

    host: str
    port: int
    base_topic: str
    client_id: str
    protocol: int
    username: str | None
    password: str | None
    tls: TlsSettings
    shared_group: str | None
    session_expiry: int
    keepalive: int


class MqttLink:
    """A paho-mqtt 2.x client with availability, a persistent session and an inbound queue.

    Args:
        settings: the ``mqtt`` section of the config (see ``MqttSettings``).
        inbound: where received messages go; give an unbounded ``queue.Queue`` (a full queue
            drops the message with an error log, because the network thread must not block).
        topics: the topic tree; built from ``settings`` when omitted.
        on_connected: called after ``online`` was published on every (re)connect, on a short-lived
            thread, so the app can republish its retained ``info`` and ``state``.
        reconnect_delay: (min, max) seconds for paho's reconnect back-off.
        stop_timeout: how long ``stop`` waits for ``stopped`` to be acknowledged.
    """

    def __init__(
        self,
        settings: MqttSettings,
        inbound: queue.Queue[InboundMessage],
        *,
        topics: Topics | None = None,
        on_connected: Callable[[], None] | None = None,
        reconnect_delay: tuple[float, float] = (1, 30),
        stop_timeout: float = 5.0,
        extra_topics: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.inbound = inbound
        self.topics = topics or Topics(settings.base_topic, getattr(settings, "shared_group", None))
        self.on_connected = on_connected
        self.extra_topics = extra_topics  # e.g. homeassistant/status, outside the request tree
        self.reconnect_delay = reconnect_delay
        self.stop_timeout = stop_timeout
        self.protocol = int(getattr(settings, "protocol", 5))
        if self.protocol not in (5, 311):
            raise ValueError(f"mqtt.protocol must be 5 or 311, not {self.protocol}")
        self.connected = threading.Event()
        self.subscribed = threading.Event()  # set when the broker acknowledged the request filters
        self._started = False
        self._stopping = False
        self._client: mqtt.Client | None = None
        self._generation = 0  # bumped on every connect: packet ids of an old connection are stale
        self._delivery_lock = threading.Lock()  # never held while calling paho
        self._on_delivered: dict[int, Callable[[], None]] = {}
        self._acked_early: set[int] = set()  # PUBACKs that beat their registration

    @property
    def is_v5(self) -> bool:
        return self.protocol == 5

    # lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Configure the client and start connecting in the background (a missing broker is fine)."""
        if self._started:
            return
        self._stopping = False
        s = self.settings
        if self.is_v5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=MQTTProtocolVersion.MQTTv5,
                manual_ack=True,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=s.client_id,
                protocol=MQTTProtocolVersion.MQTTv311,
                clean_session=False,
                manual_ack=True,
            )
        if getattr(s, "username", None):
            client.username_pw_set(s.username, getattr(s, "password", None))
        tls = getattr(s, "tls", None)
        if tls is not None and getattr(tls, "enabled", False):
            client.tls_set(
                ca_certs=getattr(tls, "ca_certs", None),
                certfile=getattr(tls, "certfile", None),
                keyfile=getattr(tls, "keyfile", None),
                cert_reqs=ssl.CERT_REQUIRED,
            )
            client.tls_insecure_set(bool(getattr(tls, "insecure", False)))
        client.will_set(self.topics.status, "offline", qos=1, retain=True)
        client.reconnect_delay_set(int(self.reconnect_delay[0]), int(self.reconnect_delay[1]))
        client.max_queued_messages_set(0)  # unlimited: QoS 1 replies wait out a broker outage
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        self._client = client

        keepalive = int(getattr(s, "keepalive", 60) or 60)
        if self.is_v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(getattr(s, "session_expiry", 86400))
            client.connect_async(s.host, int(s.port), keepalive, clean_start=False, properties=props)
        else:
            client.connect_async(s.host, int(s.port), keepalive)
        client.loop_start()
        self._started = True
        logger.info(
            "MQTT link connecting to %s:%s as %r (MQTT %s)",
            s.host, s.port, s.client_id, "5" if self.is_v5 else "3.1.1",
        )

    def stop(self, final_status: str = "stopped") -> None:
        """Publish ``final_status`` retained, wait for it (bounded), then disconnect cleanly.

        A clean disconnect does not fire the Last Will, so ``final_status`` is what stays retained.
        """
        client = self._client
        if client is None or not self._started:
            return
        self._stopping = True
        if self.connected.is_set():
            info = client.publish(self.topics.status, final_status, qos=1, retain=True)
            try:
                info.wait_for_publish(self.stop_timeout)
            except (RuntimeError, ValueError) as exc:
                logger.warning("status %r not confirmed before disconnect: %s", final_status, exc)
        else:
            logger.warning("broker unreachable at stop; status %r not published", final_status)
        client.disconnect()
        client.loop_stop()
        self.connected.clear()
        self.subscribed.clear()
        self._started = False
        logger.info("MQTT link stopped (%s)", final_status)

    # publishing -------------------------------------------------------------------------------
    def publish(
        self,
        topic: str,
        payload: Payload,
        qos: int = 1,
        retain: bool = False,
        properties: PublishProperties | Properties | None = None,
        *,
        on_delivered: Callable[[], None] | None = None,
    ) -> bool:
        """Queue a message for the broker; thread-safe and never blocks.

        Dicts and lists are sent as JSON, numbers as text. QoS 1 messages published while the
        broker is away are kept in memory and sent after the reconnect. ``on_delivered`` (QoS 1)
        is called on the network thread once the broker acknowledged the message; keep it short.
        Returns False when paho refused the message outright.
        """
        client = self._client
        if client is None:
            raise RuntimeError("MqttLink.publish called before start()")
        if "+" in topic or "#" in topic or not topic:
            raise ValueError(f"refusing to publish to {topic!r}: empty or a wildcard")
        data = encode_payload(payload)
        props = self._publish_properties(properties)
        info = client.publish(topic, data, qos=qos, retain=retain, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            logger.error("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
            return False
        if on_delivered is not None and qos > 0:
            with self._delivery_lock:
                early = info.mid in self._acked_early
                if early:
                    self._acked_early.discard(info.mid)
                else:
                    self._on_delivered[info.mid] = on_delivered
            if early:
                self._call_delivered(on_delivered)
        return True

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        with self._delivery_lock:
            callback = self._on_delivered.pop(mid, None)
            if callback is None:
                self._acked_early.add(mid)
                if len(self._acked_early) > 4096:  # PUBACKs nobody waits for (plain publishes)
                    self._acked_early.clear()
        if callback is not None:
            self._call_delivered(callback)

    @staticmethod
    def _call_delivered(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            logger.exception("delivery callback failed")

    def _ack(self, generation: int, mid: int, qos: int) -> None:
        """Acknowledge one received message, unless its connection is gone.

        After a reconnect the broker delivers an unacknowledged message again (with the DUP
        flag); that delivery is the one to acknowledge, so a stale packet id is never sent.
        """
        client = self._client
        if client is None or generation != self._generation or not self.connected.is_set():
            return
        client.ack(mid, qos)

    def _publish_properties(self, properties: PublishProperties | Properties | None) -> Properties | None:
        if properties is None or not self.is_v5:
            return None
        if isinstance(properties, Properties):
            return properties
        props = Properties(PacketTypes.PUBLISH)
        if properties.get("correlation_data") is not None:
            props.CorrelationData = bytes(properties["correlation_data"])
        if properties.get("response_topic"):
            props.ResponseTopic = str(properties["response_topic"])
        if properties.get("content_type"):
            props.ContentType = str(properties["content_type"])
        if properties.get("message_expiry") is not None:
            props.MessageExpiryInterval = int(properties["message_expiry"])
        if properties.get("user_properties"):
            props.UserProperty = [(str(k), str(v)) for k, v in properties["user_properties"]]
        return props

    # paho callbacks (network thread: no blocking, no handlers) --------------------------------
    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            logger.error("MQTT connect refused: %s", reason_code)
            return
        session = getattr(flags, "session_present", False)
        logger.info("MQTT connected (session present: %s)", session)
        self._generation += 1
        self.connected.set()
        client.publish(self.topics.status, "online", qos=1, retain=True)
        filters = [*self.topics.subscriptions(), *self.extra_topics]
        if self.is_v5:
            client.subscribe([(t, SubscribeOptions(qos=1)) for t in filters])
        else:
            client.subscribe([(t, 1) for t in filters])
        if self.on_connected is not None:
            threading.Thread(target=self._run_on_connected, name="mqtt-on-connected", daemon=True).start()

    def _run_on_connected(self) -> None:
        try:
            if self.on_connected is not None:
                self.on_connected()
        except Exception:
            logger.exception("on_connected hook failed")

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if self._stopping:
            return
        logger.warning("MQTT disconnected (%s); paho reconnects with back-off", reason_code)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        failed = [rc for rc in reason_codes if getattr(rc, "is_failure", False)]
        for rc in failed:
            logger.error("MQTT subscription refused: %s", rc)
        if not failed:
            self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            item = message_from_paho(msg)
            if msg.qos > 0:
                generation, mid, qos = self._generation, msg.mid, msg.qos
                item = dataclasses.replace(item, ack=lambda: self._ack(generation, mid, qos))
            self.inbound.put_nowait(item)
        except queue.Full:
            logger.error("inbound queue full; dropped a message on %s", msg.topic)
        except Exception:
            logger.exception("could not enqueue a message on %s", getattr(msg, "topic", "?"))


def message_from_paho(msg: mqtt.MQTTMessage) -> InboundMessage:
    """Copy what the handlers need out of a paho message (properties only exist on MQTT 5)."""
    props = getattr(msg, "properties", None)
    response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
    correlation = getattr(props, "CorrelationData", None) if props is not None else None
    expiry = getattr(props, "MessageExpiryInterval", None) if props is not None else None
    return InboundMessage(
        topic=msg.topic,
        payload=bytes(msg.payload),
        response_topic=response_topic or None,
        correlation_data=bytes(correlation) if correlation is not None else None,
        message_expiry=int(expiry) if expiry is not None else None,
        received_at=time.monotonic(),
        qos=int(msg.qos),
        dup=bool(getattr(msg, "dup", False)),
        mid=int(getattr(msg, "mid", 0) or 0),
    )


def encode_payload(payload: Payload) -> bytes:
    """Bytes for the wire: str as UTF-8, dicts/lists as compact JSON, numbers as text."""
    if payload is None:
        return b""
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode("utf-8", "replace")  # a lone surrogate must not lose a reply
    if isinstance(payload, bool):
        return b"true" if payload else b"false"
    if isinstance(payload, int | float):
        return str(payload).encode()
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (echoed ids): escaped JSON is still valid
        return json.dumps(payload, separators=(",", ":")).encode("ascii")
