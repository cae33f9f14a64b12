"""The MQTT link against a real Mosquitto: availability, sessions, outages, both MQTT versions."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import MosquittoBroker
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.mqtt_link import InboundMessage, MqttLink

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Tls:
    enabled: bool = False
    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    insecure: bool = False


@dataclass
class Settings:
    """Stands in for ``ApplianceConfig.mqtt`` (same field names)."""

    port: int
    base_topic: str
    host: str = "127.0.0.1"
    client_id: str = field(default_factory=lambda: f"link-{uuid.uuid4().hex[:8]}")
    protocol: int = 5
    username: str | None = None
    password: str | None = None
    tls: Tls = field(default_factory=Tls)
    shared_group: str | None = None
    session_expiry: int = 300
    keepalive: int = 5
    max_payload: int = 65536


class Watcher:
    """A plain paho client that records what arrives on the filters it subscribes to."""

    def __init__(self, port: int, *filters: str) -> None:
        self.messages: list[tuple[str, bytes, bool, Any]] = []
        self.cond = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"w-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.filters = filters
        self.ready = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 5)
        self.client.loop_start()
        assert self.ready.wait(5), "watcher did not subscribe"

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        if self.filters:
            client.subscribe([(f, 1) for f in self.filters])
        else:
            self.ready.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain), msg.properties))
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[tuple[str, bytes, bool, Any]], bool], timeout: float = 10) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for m in self.messages:
                    if pred(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"not received; got {[(t, p) for t, p, *_ in self.messages]}")
                self.cond.wait(left)

    def publish(self, topic: str, payload: bytes | str, properties: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def status_is(base: str, value: str) -> Callable[[tuple[str, bytes, bool, Any]], bool]:
    return lambda m: m[0] == f"{base}/status" and m[1] == value.encode()


@pytest.fixture
def watchers(mqtt_broker: MosquittoBroker) -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(*filters: str) -> Watcher:
        w = Watcher(mqtt_broker.port, *filters)
        made.append(w)
        return w

    yield make
    for w in made:
        w.close()


def make_link(settings: Settings, **kw: Any) -> tuple[MqttLink, queue.Queue[InboundMessage]]:
    q: queue.Queue[InboundMessage] = queue.Queue()
    kw.setdefault("reconnect_delay", (1, 2))
    kw.setdefault("stop_timeout", 3)
    return MqttLink(settings, q, **kw), q


@pytest.mark.parametrize("protocol", [5, 311])
def test_online_inbound_and_stopped(mqtt_broker, watchers, mqtt_base_topic, protocol) -> None:  # type: ignore[no-untyped-def]
    base = f"{mqtt_base_topic}_{protocol}"
    link, q = make_link(Settings(mqtt_broker.port, base, protocol=protocol))
    link.start()
    try:
        assert link.subscribed.wait(5)
        watchers(f"{base}/status").wait_for(status_is(base, "online"))
        sender = watchers()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "client/reply"
        props.CorrelationData = b"\x01\x02"
        props.MessageExpiryInterval = 30
        sender.publish(f"{base}/request/chat", b'{"prompt": "hi"}', properties=props)
        msg = q.get(timeout=5)
        assert msg.topic == f"{base}/request/chat" and msg.payload == b'{"prompt": "hi"}'
        assert msg.qos == 1
        if protocol == 5:
            assert msg.response_topic == "client/reply"
            assert msg.correlation_data == b"\x01\x02"
            assert msg.message_expiry is not None and 0 < msg.message_expiry <= 30
        else:  # a 3.1.1 session carries no properties
            assert msg.response_topic is None and msg.correlation_data is None
        # outbound: JSON + correlation data on MQTT 5
        out = watchers("client/#")
        link.publish("client/reply", {"id": 1}, properties={"correlation_data": b"cd"})
        got = out.wait_for(lambda m: m[0] == "client/reply")
        assert got[1] == b'{"id":1}'
        if protocol == 5:
            assert got[3].CorrelationData == b"cd"
    finally:
        link.stop()
    # retained final status, seen by a dashboard that opens later
    watchers(f"{base}/status").wait_for(lambda m: m[1] == b"stopped" and m[2])


def test_refuses_wildcard_publish(mqtt_broker, mqtt_base_topic) -> None:  # type: ignore[no-untyped-def]
    link, _ = make_link(Settings(mqtt_broker.port, mqtt_base_topic))
    link.start()
    try:
        with pytest.raises(ValueError):
            link.publish("a/+/b", "x")
    finally:
        link.stop()


LINK_SCRIPT = textwrap.dedent(
    """
    import queue, sys, time
    from dataclasses import dataclass
    from appliance.mqtt_link import MqttLink

    @dataclass
    class Tls:
        enabled: bool = False

    @dataclass
    class S:
        port: int
        base_topic: str
        host: str = "127.0.0.1"
        client_id: str = "lwt-" + sys.argv[2]
        protocol: int = 5
        username: None = None
        password: None = None
        tls: Tls = None  # type: ignore[assignment]
        shared_group: None = None
        session_expiry: int = 60
        keepalive: int = 5

    link = MqttLink(S(int(sys.argv[1]), sys.argv[2]), queue.Queue(), reconnect_delay=(1, 2))
    link.start()
    assert link.subscribed.wait(10)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_last_will_offline_after_sigkill(mqtt_broker, watchers, mqtt_base_topic) -> None:  # type: ignore[no-untyped-def]
    base = mqtt_base_topic
    watcher = watchers(f"{base}/status")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", LINK_SCRIPT, str(mqtt_broker.port), base],
        stdout=subprocess.PIPE, cwd=ROOT, env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        watcher.wait_for(status_is(base, "online"))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        watcher.wait_for(status_is(base, "offline"), timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    # retained: a late subscriber sees offline too
    watchers(f"{base}/status").wait_for(lambda m: m[1] == b"offline" and m[2])


@pytest.mark.parametrize("protocol", [5, 311])
def test_persistent_session_keeps_requests_while_away(  # type: ignore[no-untyped-def]
    mqtt_broker, watchers, mqtt_base_topic, protocol
) -> None:
    """Prompts published while the appliance is down are delivered when it comes back."""
    base = f"{mqtt_base_topic}_{protocol}"
    settings = Settings(mqtt_broker.port, base, protocol=protocol)
    link, _ = make_link(settings)
    link.start()
    assert link.subscribed.wait(5)
    link.stop()
    watchers().publish(f"{base}/request/chat", b"while you were away")
    link2, q2 = make_link(settings)
    link2.start()
    try:
        msg = q2.get(timeout=10)
        assert msg.payload == b"while you were away"
    finally:
        link2.stop()


@pytest.mark.parametrize("protocol", [5, 311])
def test_a_request_not_acknowledged_is_delivered_again_and_an_acknowledged_one_is_not(  # type: ignore[no-untyped-def]
    mqtt_broker, watchers, mqtt_base_topic, protocol
) -> None:
    """The broker keeps a request until the application acknowledges it, across a reconnect."""
    base = f"{mqtt_base_topic}_{protocol}"
    settings = Settings(mqtt_broker.port, base, protocol=protocol)
    link, q = make_link(settings)
    link.start()
    assert link.subscribed.wait(5)
    sender = watchers()
    sender.publish(f"{base}/request/chat", b"kept")
    sender.publish(f"{base}/request/chat", b"done")
    kept, done = q.get(timeout=5), q.get(timeout=5)
    assert (kept.payload, done.payload, kept.dup) == (b"kept", b"done", False)
    assert done.ack is not None
    done.ack()
    time.sleep(0.3)  # the PUBACK reaches the broker
    link.stop()
    link2, q2 = make_link(settings)
    link2.start()
    try:
        again = q2.get(timeout=10)
        assert again.payload == b"kept" and again.dup, "the unacknowledged request comes again"
        assert again.ack is not None
        again.ack()
        with pytest.raises(queue.Empty):
            q2.get(timeout=1)
    finally:
        link2.stop()


def test_broker_restart(tmp_path: Path, mqtt_base_topic: str) -> None:
    """After a broker restart: online + retained info/state republished, resubscribed, queue flushed."""
    broker = MosquittoBroker(tmp_path / "restart").start()
    base = mqtt_base_topic
    link: MqttLink | None = None
    watcher: Watcher | None = None
    try:
        settings = Settings(broker.port, base, keepalive=2)
        connects: list[float] = []

        def republish() -> None:
            connects.append(time.monotonic())
            assert link is not None
            link.publish(f"{base}/info", {"version": "t"}, retain=True)
            link.publish(f"{base}/state", {"state": "idle"}, retain=True)

        link, q = make_link(settings, on_connected=republish)
        link.start()
        assert link.subscribed.wait(5)

        broker.stop()
        deadline = time.monotonic() + 10
        while link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.connected.is_set()
        for i in range(5):  # QoS 1 while the broker is down: kept and sent after the reconnect
            link.publish(f"{base}/queued/{i}", f"m{i}", qos=1, retain=True)
        broker.start()

        assert link.subscribed.wait(15), "link did not reconnect and resubscribe"
        watcher = Watcher(broker.port, f"{base}/#")
        expected = [("status", b"online"), ("info", b'{"version":"t"}'), ("state", b'{"state":"idle"}')]
        for topic, value in expected:
            watcher.wait_for(lambda m, t=topic, v=value: m[0] == f"{base}/{t}" and m[1] == v)
        for i in range(5):
            watcher.wait_for(lambda m, i=i: m[0] == f"{base}/queued/{i}" and m[1] == f"m{i}".encode())
        assert len(connects) == 2
        watcher.publish(f"{base}/request/health_check", b"{}")
        assert q.get(timeout=5).topic == f"{base}/request/health_check"
    finally:
        if watcher is not None:
            watcher.close()
        if link is not None:
            link.stop()
        broker.stop()


def test_shared_subscription(mqtt_broker, watchers, mqtt_base_topic) -> None:  # type: ignore[no-untyped-def]
    link, q = make_link(Settings(mqtt_broker.port, mqtt_base_topic, shared_group="npus"))
    link.start()
    try:
        assert link.subscribed.wait(5)
        watchers().publish(f"{mqtt_base_topic}/request/chat", b"hello")
        msg = q.get(timeout=5)
        assert msg.topic == f"{mqtt_base_topic}/request/chat"
        assert link.topics.request_kind(msg.topic) == "chat"
    finally:
        link.stop()
