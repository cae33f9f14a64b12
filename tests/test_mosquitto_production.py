"""The production broker: mosquitto/production.conf with the users, ACL and TLS pair that
scripts/mosquitto_users makes. Every role can do what it must and nothing else."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import MOSQUITTO, free_port, port_open
from mqtt_client import write_config
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from appliance.app import Appliance
from appliance.config import load_config
from appliance.ha_discovery import build_discovery
from appliance.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
NOT_AUTHORIZED = 135  # MQTT 5 reason code 0x87


class Broker:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        subprocess.run([str(ROOT / "scripts/mosquitto_users"), "--dir", str(folder / "etc"),
                        "--user", "arduino-7:prompter", "--user", "arduino-8:prompter"],
                       check=True, capture_output=True)
        self.passwords = dict(line.split(":", 1) for line in (folder / "etc/credentials").read_text().split())
        self.port, self.tls_port, self.ws_port = free_port(), free_port(), free_port()
        conf = (ROOT / "mosquitto/production.conf").read_text()
        conf = conf.replace("/etc/mosquitto/appliance", str(folder / "etc"))
        conf = conf.replace("/var/lib/mosquitto/", f"{folder}/data/")
        for default, port in (("1883", self.port), ("8883", self.tls_port), ("9001", self.ws_port)):
            conf = re.sub(rf"^listener {default}$", f"listener {port} 127.0.0.1", conf, flags=re.M)
        (folder / "data").mkdir()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(conf + "\nuser root\nlog_dest stderr\n")
        self.log = (folder / "mosquitto.log").open("wb")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while not all(port_open(p) for p in (self.port, self.tls_port, self.ws_port)):
            assert self.proc.poll() is None, (folder / "mosquitto.log").read_text()
            assert time.monotonic() < deadline, "the production broker did not open its ports"
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("production-broker"))
    yield b
    b.stop()


class Session:
    """A v5 client that reports the broker's answers: CONNACK, SUBACK and PUBACK reason codes."""

    def __init__(self, broker: Broker, user: str | None, password: str | None = None, *,
                 transport: str = "tcp", tls: bool = False) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, transport=transport)  # type: ignore[arg-type]
        if user is not None:
            self.c.username_pw_set(user, password if password is not None else broker.passwords[user])
        port = broker.ws_port if transport == "websockets" else broker.port
        if tls:
            self.c.tls_set(ca_certs=str(broker.folder / "etc/certs/ca.crt"), cert_reqs=ssl.CERT_REQUIRED)
            port = broker.tls_port
        self.connack: Any = None
        self.acks: dict[int, Any] = {}
        self.messages: list[mqtt.MQTTMessage] = []
        self.cond = threading.Condition()
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = lambda c, u, mid, codes, p: self._ack(mid, codes[0])
        self.c.on_publish = lambda c, u, mid, code, p: self._ack(mid, code)
        self.c.on_message = self._on_message
        self.c.connect("localhost" if tls else "127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        with self.cond:
            assert self.cond.wait_for(lambda: self.connack is not None, 10), "no CONNACK"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, code: Any, props: Any) -> None:
        with self.cond:
            self.connack = code
            self.cond.notify_all()

    def _ack(self, mid: int, code: Any) -> None:
        with self.cond:
            self.acks[mid] = code
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _wait_ack(self, mid: int) -> int:
        with self.cond:
            assert self.cond.wait_for(lambda: mid in self.acks, 10), "no acknowledgement"
            return int(self.acks[mid].value)

    def can_subscribe(self, topic: str) -> bool:
        _, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=1))
        return self._wait_ack(mid) in (0, 1, 2)

    def can_publish(self, topic: str, payload: str = "x") -> bool:
        code = self._wait_ack(self.c.publish(topic, payload, qos=1).mid)
        assert code in (0, 16, NOT_AUTHORIZED), code  # 16: accepted, nobody subscribed
        return code != NOT_AUTHORIZED

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_anonymous_and_wrong_passwords_are_refused(broker: Broker) -> None:
    for user, password in ((None, None), ("prompter", "wrong"), ("nobody", "x")):
        s = Session(broker, user, password)
        assert s.connack.is_failure, (user, s.connack)
        s.close()


# role: (may publish, may read); concrete topics, so reading is checked by delivery.
ALLOWED: dict[str, tuple[list[str], list[str]]] = {
    "prompter": (["appliance/request/chat/prompter", "appliance/request/image/prompter",
                  "appliance/request/cancel/prompter", "appliance/request/speak/prompter",
                  "appliance/listen/prompter/audio"],
                 ["replies/prompter/chat", "replies/prompter/chat/text", "replies/prompter/chat/stream/a1",
                  "replies/prompter/chat/progress/a1", "appliance/status"]),
    "arduino-7": (["appliance/request/chat/arduino-7"], ["replies/arduino-7/chat", "replies/arduino-7/x/y"]),
    "display": ([], ["appliance/audio/lobby", "appliance/audio/lobby/chunk",
                     "appliance/display/main", "appliance/display/main/meta",
                     "appliance/display/main/preview", "appliance/queue", "appliance/status"]),
    "dashboard": (["appliance/request/chat"],
                  ["appliance/telemetry", "appliance/telemetry/queue_depth", "appliance/status",
                   "appliance/state", "appliance/event", "appliance/display/main", "appliance/queue",
                   "appliance/progress/a1"]),
    # every topic its discovered entities use: states, controls, the picture and its prompt box
    "homeassistant": (["homeassistant/status", "appliance/request/restart", "appliance/request/pause",
                       "appliance/request/chat", "appliance/request/image", "appliance/request/scene"],
                      ["homeassistant/device/x/config", "appliance/telemetry/queue_depth",
                       "appliance/state", "appliance/status", "appliance/event", "appliance/scene",
                       "appliance/display/main", "appliance/display/main/meta", "appliance/response/chat"]),
    "appliance": (["appliance/status", "appliance/display/main", "homeassistant/device/x/config",
                   "replies/a"],
                  ["appliance/request/chat", "homeassistant/status"]),
    "admin": (["anything/at/all"], ["anything/at/all"]),
}
# role: (must not publish, must not read)
DENIED: dict[str, tuple[list[str], list[str]]] = {
    "prompter": (["appliance/status", "appliance/display/main", "appliance/request/restart",
                  "appliance/telemetry/queue_depth", "homeassistant/device/x/config",
                  # in public, or in another sender's name
                  "appliance/request/chat", "appliance/request/cancel", "appliance/request/chat/arduino-7",
                  "appliance/request/cancel/arduino-7", "replies/prompter/chat",
                  "appliance/request/speak", "appliance/listen/arduino-7/audio"],
                 ["appliance/display/main", "appliance/request/chat", "appliance/event",
                  # the shared answers and streams, and every other sender's replies
                  "appliance/response/chat", "appliance/response/chat/text", "appliance/stream/a1",
                  "appliance/progress/a1", "replies/arduino-7/chat/progress/a1",
                  "replies/arduino-7/chat", "replies/arduino-7/chat/text", "replies/x",
                  "appliance/response/transcribe", "appliance/audio/lobby"]),
    "arduino-7": (["appliance/request/chat/arduino-8", "appliance/request/chat/prompter"],
                  ["replies/arduino-8/chat", "replies/prompter/chat"]),
    "display": (["appliance/request/chat", "appliance/request/image", "appliance/display/main"],
                ["appliance/request/chat", "appliance/telemetry/queue_depth", "appliance/response/chat"]),
    "dashboard": (["appliance/status", "appliance/request/restart", "appliance/display/main"],
                  ["appliance/request/chat", "homeassistant/status"]),
    "homeassistant": (["appliance/status", "appliance/display/main", "appliance/request/cancel",
                       "appliance/request/image/arduino-7"],
                      ["appliance/request/chat", "replies/arduino-7/chat"]),
    "appliance": (["other/topic"], ["other/topic"]),
}


def reads(role: Session, admin: Session, topics: list[str]) -> list[str]:
    """The topics among ``topics`` on which ``role`` receives what the admin publishes."""
    for topic in topics:
        role.can_subscribe(topic)
    for topic in topics:
        admin.can_publish(topic, "probe")
    time.sleep(0.4)
    with role.cond:
        got = sorted({m.topic for m in role.messages})
        role.messages.clear()
    return got


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_role_can_do_what_it_must_and_nothing_else(broker: Broker, role: str) -> None:
    s, admin = Session(broker, role), Session(broker, "admin")
    try:
        assert not s.connack.is_failure
        may_publish, may_read = ALLOWED[role]
        must_not_publish, must_not_read = DENIED.get(role, ([], []))
        assert [t for t in may_publish if not s.can_publish(t)] == []
        assert [t for t in must_not_publish if s.can_publish(t)] == []
        assert reads(s, admin, may_read) == sorted(set(may_read))
        assert reads(s, admin, must_not_read) == []
    finally:
        s.close()
        admin.close()


def install_home_assistant_topics(base: str) -> tuple[set[str], set[str]]:
    """(read, written) topics that docs/INSTALL.md's Home Assistant section and its automation
    example use, moved onto ``base``: the automation's ``topic:`` lines and the section's
    `request/...`, `response/...` and `homeassistant/...` names."""
    text = (ROOT / "docs/INSTALL.md").read_text()
    section = text.split("### Home Assistant\n", 1)[1].split("\n### ", 1)[0]
    reads_ = {base + "/" + t.split("/", 1)[1] for t in re.findall(r"^\s*topic: (\S+)$", section, re.M)}
    named = set(re.findall(r"`((?:request|response|homeassistant)/[a-z/]+)`", section))
    writes = {f"{base}/{t}" for t in named if t.startswith("request/")}
    reads_ |= {t if t.startswith("homeassistant/") else f"{base}/{t}" for t in named - {*writes}
               if not t.startswith("request/")}
    return reads_, writes


def test_home_assistant_may_use_every_topic_its_discovered_entities_use(broker: Broker) -> None:
    """Read from the discovery payload itself, the image model's and the scenes' entities
    included, and from the topics INSTALL.md's Home Assistant section and automation use."""
    _, payload = build_discovery(Topics("appliance"), version="1", model_ids=["sd"], display="main",
                                 scenes=["opening", "night"])
    comps = payload["components"].values()
    reads_ = {c[k] for c in comps for k in ("state_topic", "image_topic") if k in c}
    reads_ |= {a["topic"] for a in payload["availability"]}
    writes = {c["command_topic"] for c in comps if "command_topic" in c}
    assert "appliance/display/main" in reads_ and "appliance/request/image" in writes
    assert "appliance/scene" in reads_ and "appliance/request/scene" in writes
    doc_reads, doc_writes = install_home_assistant_topics("appliance")
    assert "appliance/event" in doc_reads and "appliance/response/chat" in doc_reads
    assert "appliance/request/pause" in doc_writes and "homeassistant/status" in doc_reads
    reads_ |= doc_reads
    writes |= doc_writes
    ha, admin = Session(broker, "homeassistant"), Session(broker, "admin")
    try:
        assert [t for t in sorted(writes) if not ha.can_publish(t)] == []
        assert reads(ha, admin, sorted(reads_)) == sorted(reads_)
    finally:
        ha.close()
        admin.close()


def test_a_wildcard_subscription_only_delivers_what_the_role_may_read(broker: Broker) -> None:
    """Mosquitto accepts a subscription to '#' and filters each message by the reader's ACL."""
    dashboard, admin = Session(broker, "dashboard"), Session(broker, "admin")
    try:
        dashboard.can_subscribe("#")
        for topic in ("appliance/request/chat", "appliance/telemetry/queue_depth", "replies/x"):
            admin.can_publish(topic, topic)
        with dashboard.cond:
            assert dashboard.cond.wait_for(lambda: dashboard.messages, 5)
        time.sleep(0.3)
        assert [m.topic for m in dashboard.messages] == ["appliance/telemetry/queue_depth"]
    finally:
        dashboard.close()
        admin.close()


def test_a_refused_prompt_never_reaches_the_appliance(broker: Broker) -> None:
    appliance = Session(broker, "appliance")
    display, sensor = Session(broker, "display"), Session(broker, "arduino-7")
    try:
        assert appliance.can_subscribe("appliance/request/#")
        display.can_publish("appliance/request/chat", "from a display")
        sensor.can_publish("appliance/request/chat", "in public, which a prompter may not")
        sensor.can_publish("appliance/request/chat/arduino-8", "in another's name")
        sensor.can_publish("appliance/request/chat/arduino-7", "from a sensor")
        with appliance.cond:
            assert appliance.cond.wait_for(lambda: appliance.messages, 5)
        time.sleep(0.3)
        assert [m.payload for m in appliance.messages] == [b"from a sensor"]
    finally:
        for s in (appliance, display, sensor):
            s.close()


def test_tls_and_websockets_listeners(broker: Broker) -> None:
    tls = Session(broker, "prompter", tls=True)
    ws = Session(broker, "dashboard", transport="websockets")
    try:
        assert not tls.connack.is_failure and tls.can_publish("appliance/request/chat/prompter")
        assert not ws.connack.is_failure and ws.can_subscribe("appliance/telemetry/#")
    finally:
        tls.close()
        ws.close()



def test_a_qos0_prompt_sent_while_the_appliance_restarts_is_answered(  # type: ignore[no-untyped-def]
    broker: Broker, tmp_path: Path, demo_bundle_fp32: Path,
) -> None:
    """Before any test that keeps an appliance running: this one stops and starts its own."""
    config = load_config(write_config(tmp_path, broker.port, "appliance", demo_bundle_fp32, mqtt={
        "username": "appliance", "password": broker.passwords["appliance"]}), env={})

    def started() -> Appliance:
        app = Appliance(config)
        app.start()
        assert app.engine.workers[0].loaded.wait(60) and app.link.subscribed.wait(10)
        return app

    sensor = Session(broker, "arduino-7")
    try:
        assert sensor.can_subscribe("replies/arduino-7/chat")
        started().stop()  # its persistent session stays at the broker
        prompt = json.dumps({"id": "q0", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
        sensor.c.publish("appliance/request/chat/arduino-7", prompt, qos=0).wait_for_publish(5)
        time.sleep(0.3)
        assert not sensor.messages, "nothing answers while the appliance is away"
        app = started()
        try:
            (reply,) = replies(sensor, "replies/arduino-7/chat")
            assert reply["id"] == "q0" and reply["status"] == "ok"
        finally:
            app.stop()
    finally:
        sensor.close()

@pytest.fixture(scope="module")
def running_app(broker: Broker, tmp_path_factory: pytest.TempPathFactory,
                demo_bundle_fp32: Path) -> Iterator[Appliance]:
    path = write_config(tmp_path_factory.mktemp("production-app"), broker.port, "appliance",
                        demo_bundle_fp32,
                        mqtt={"username": "appliance", "password": broker.passwords["appliance"]})
    app = Appliance(load_config(path, env={}))
    app.start()
    try:
        for worker in app.engine.workers:
            assert worker.loaded.wait(60)
        assert app.link.subscribed.wait(10)
        yield app
    finally:
        app.stop()


def replies(session: Session, topic: str, n: int = 1, timeout: float = 30) -> list[dict[str, Any]]:
    with session.cond:
        assert session.cond.wait_for(
            lambda: len([m for m in session.messages if m.topic == topic]) >= n, timeout
        ), f"no reply on {topic}: {[m.topic for m in session.messages]}"
        return [json.loads(m.payload) for m in session.messages if m.topic == topic]


def test_the_appliance_answers_a_prompter_in_its_own_reply_space(
    broker: Broker, running_app: Appliance,
) -> None:
    sensor = Session(broker, "arduino-7")
    try:
        assert sensor.can_subscribe("replies/arduino-7/#")
        sensor.can_publish("appliance/request/chat/arduino-7",
                           json.dumps({"id": "t", "prompt": "Hi", "max_tokens": 3}))
        (reply,) = replies(sensor, "replies/arduino-7/chat")
        assert reply["id"] == "t" and reply["status"] == "ok"
        with sensor.cond:
            assert sensor.cond.wait_for(
                lambda: any(m.topic == "replies/arduino-7/chat/text" for m in sensor.messages), 5)
    finally:
        sensor.close()


def test_two_prompters_neither_reads_the_others_replies_nor_cancels_the_others_job(
    broker: Broker, running_app: Appliance,
) -> None:
    """arduino-7 runs a long streamed job; arduino-8 listens everywhere it can and tries to cancel it."""
    a7, a8 = Session(broker, "arduino-7"), Session(broker, "arduino-8")
    try:
        assert a7.can_subscribe("replies/arduino-7/#")
        for topic in ("#", "replies/#", "replies/arduino-7/#", "appliance/stream/#", "appliance/response/#"):
            a8.can_subscribe(topic)  # Mosquitto accepts and filters each message by a8's ACL
        long_job = {"id": "job-7", "prompt": "Tell a long story.", "max_tokens": 400, "stream": True,
                    "temperature": 0}
        a7.can_publish("appliance/request/chat/arduino-7", json.dumps(long_job))
        with a7.cond:
            assert a7.cond.wait_for(lambda: any("/stream/" in m.topic for m in a7.messages), 30)
        # arduino-8 cannot cancel in arduino-7's name, nor in public; in its own name it reaches nothing.
        assert not a8.can_publish("appliance/request/cancel/arduino-7", "job-7")
        assert not a8.can_publish("appliance/request/cancel", "job-7")
        assert a8.can_publish("appliance/request/cancel/arduino-8", "job-7")
        answer = replies(a8, "replies/arduino-8/cancel")[0]  # a copy per matching subscription
        assert answer["status"] == "ok" and answer["data"] == {"cancelled": 0}
        # arduino-7 cancels its own job: it ends cancelled, and only arduino-7 heard any of it.
        a7.can_publish("appliance/request/cancel/arduino-7", "job-7")
        (cancel,) = replies(a7, "replies/arduino-7/cancel")
        assert cancel["data"] == {"cancelled": 1}
        (final,) = replies(a7, "replies/arduino-7/chat")
        assert final["id"] == "job-7" and final["error"]["code"] == "cancelled"
        time.sleep(0.3)
        with a8.cond:
            heard = sorted({m.topic for m in a8.messages})
        assert heard == ["appliance/status", "replies/arduino-8/cancel"], heard  # status: retained
    finally:
        a7.close()
        a8.close()
