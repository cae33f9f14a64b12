"""The Node-RED example flow (examples/node-red/flows.json).

Read as a file: core and FlowFuse Dashboard 2.0 nodes only, every reference resolves, and the
broker and the base topic come from one place, the tab's environment. Run in a real Node-RED with
the dashboard (installed into .cache/node-red by ./scripts/test's set-up), against a real Mosquitto
that lets in only known users and a fake appliance: deployed as a user imports it, with only the
tab's environment changed, it starts without a node error, every widget shows its topic under that
base topic, and the prompt form asks on ``{base}/request/chat`` and shows its own answer.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import MOSQUITTO, MosquittoBroker, free_port, port_open
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from appliance.config import ThermalConfig
from appliance.telemetry import headline_values
from appliance.topics import Topics
from handlers.payloads import ChatPayload, PayloadError, decode_payload, describe_validation, usable_id
from handlers.reply import Reply, route_reply

ROOT = Path(__file__).resolve().parents[1]
FLOW = ROOT / "examples/node-red/flows.json"
NODE_RED = ROOT / ".cache/node-red/node_modules/node-red/red.js"  # scripts/lib/setup.sh installs it
CORE = {"tab", "comment", "function", "change", "switch", "json", "template", "inject", "debug",
        "mqtt in", "mqtt out", "mqtt-broker", "link in", "link out", "delay"}
DASHBOARD = {"ui-base", "ui-theme", "ui-page", "ui-group", "ui-gauge", "ui-chart", "ui-text", "ui-form",
             "ui-template", "ui-button", "ui-notification"}
# A node's property that names another node, and the type that node must have.
REFERENCES = {"z": "tab", "group": "ui-group", "page": "ui-page", "ui": "ui-base", "theme": "ui-theme"}
REQUIRED = {"ui-gauge": ("group",), "ui-chart": ("group",), "ui-text": ("group",), "ui-form": ("group",),
            "ui-template": ("group",), "ui-group": ("page",), "ui-page": ("ui", "theme"),
            "mqtt in": ("broker",), "mqtt out": ("broker",)}
SETTINGS = ("BROKER_HOST", "BROKER_PORT", "BROKER_USER", "BROKER_PASSWORD", "BASE_TOPIC")


def nodes() -> list[dict[str, Any]]:
    data = json.loads(FLOW.read_text())
    assert isinstance(data, list)
    return data


def named(flow: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (node,) = [n for n in flow if n["type"] == kind and n.get("name") == name]
    return node


def test_only_core_and_dashboard_nodes_and_every_reference_resolves() -> None:
    flow = nodes()
    ids = [node["id"] for node in flow]
    by_id = {node["id"]: node for node in flow}
    assert len(ids) == len(set(ids))
    types = {node["type"] for node in flow}
    assert types <= CORE | DASHBOARD
    # Node-RED reads any config property equal to a node id as a reference: an id equal to a type
    # makes that config node depend on itself ("Circular config node dependency").
    assert not set(ids) & (CORE | DASHBOARD)
    for node in flow:
        for output in node.get("wires", []):
            assert set(output) <= set(ids), node["id"]
        refs = dict(REFERENCES)
        if node["type"] in ("mqtt in", "mqtt out"):
            refs["broker"] = "mqtt-broker"  # on the mqtt-broker node itself, "broker" is the host name
        for ref, kind in refs.items():
            if node.get(ref):
                assert by_id[node[ref]]["type"] == kind, (node["id"], ref)
        for ref in REQUIRED.get(node["type"], ()):
            assert node.get(ref) in by_id, (node["id"], ref)


def test_the_broker_and_the_base_topic_are_set_once_in_the_tab_environment() -> None:
    flow = nodes()
    (tab,) = [n for n in flow if n["type"] == "tab"]
    assert [e["name"] for e in tab["env"]] == list(SETTINGS)
    assert {e["name"]: e["type"] for e in tab["env"]}["BROKER_PASSWORD"] == "cred"
    (broker,) = [n for n in flow if n["type"] == "mqtt-broker"]
    assert broker["z"] == tab["id"]  # scoped to the tab, so it sees the tab's environment
    assert (broker["broker"], broker["port"]) == ("${BROKER_HOST}", "${BROKER_PORT}")
    assert broker["credentials"] == {"user": "${BROKER_USER}", "password": "${BROKER_PASSWORD}"}
    for node in flow:
        if node["type"] in ("mqtt in", "mqtt out"):
            assert node["topic"] == "", node["name"]  # computed from BASE_TOPIC at run time
    code = json.dumps([n for n in flow if n["type"] != "tab"])
    assert "appliance/" not in code and "localhost" not in code


def test_the_temperature_gauge_colours_follow_the_thermal_policy() -> None:
    gauge = named(nodes(), "ui-gauge", "NPU temperature")
    limits = ThermalConfig()
    starts = [float(s["from"]) for s in gauge["segments"]][1:]
    assert starts == [limits.warn, limits.throttle, limits.pause]


# --- in a real Node-RED ------------------------------------------------------------------------
BASE = "gallery"  # not the default base topic: the flow must follow its BASE_TOPIC
USERS = {"dashboard": "dashboard-secret", "appliance": "appliance-secret"}
FIGURES = {"temperature_c": 61.5, "npu_load_pct": 37.0, "cmm_free_mib": 812, "tokens_per_s": 12.5,
           "queue_depth": 2}
STATE = {"state": "busy", "queue_depth": 2, "running": 1, "queue_max": 32, "reason": None, "ts": 1.0}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))  # the bytes are passed on, never decoded
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(32))  # a step preview's bytes, passed on the same way
QUEUE = {"length": 2, "running": 1, "queue_max": 32, "eta_s": 4.4, "ts": 1.0}
META = {"id": "p1", "prompt": "a lighthouse in a storm at night", "seed": 42, "steps": 4,
        "content_type": "image/png", "bytes": len(PNG)}


def node_red_or_skip() -> Path:
    if NODE_RED.is_file():
        return NODE_RED
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed here, so Node-RED cannot be")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    major, minor = (int(p) for p in version.lstrip("v").split(".")[:2])
    if (major, minor) < (18, 5):
        pytest.skip(f"Node.js {version} is older than Node-RED 4 needs (18.5)")
    pytest.fail(f"Node-RED is not installed in {NODE_RED.parents[2]}: "
                "run ./scripts/test (its set-up installs it)")


class LoginBroker(MosquittoBroker):
    """The test broker, refusing anonymous clients: the flow must log in with its tab's user."""

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        super().__init__(workdir)
        self.passwords = self.workdir / "passwords"
        for user, password in users.items():
            create = [] if self.passwords.exists() else ["-c"]
            subprocess.run(["mosquitto_passwd", "-b", *create, str(self.passwords), user, password],
                           check=True, capture_output=True)

    def start(self, timeout: float = 10.0) -> LoginBroker:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {self.passwords}\n"
            "persistence false\nuser root\nlog_dest stderr\nlog_type error\nlog_type warning\n"
        )
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"mosquitto did not open port {self.port}"
            time.sleep(0.05)
        return self


class FakeAppliance:
    """Plays the appliance: retained figures, state and image under ``BASE``, and answers chat
    requests with the appliance's own reply code, each preceded by someone else's answer."""

    def __init__(self, port: int, password: str) -> None:
        self.topics = Topics(BASE)
        self.requests: list[mqtt.MQTTMessage] = []
        self.error: tuple[str, str] | None = None  # when set, requests are answered with this error
        self.cond = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.username_pw_set("appliance", password)
        self.c.on_message = self._on_request
        subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_connect = lambda c, *a: c.subscribe(self.topics.request("chat"), qos=1)
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()
        assert subscribed.wait(10), "the fake appliance could not subscribe"

    def publish(self, topic: str, payload: Any, qos: int = 1, retain: bool = False,
                properties: dict[str, Any] | None = None, **_: Any) -> mqtt.MQTTMessageInfo:
        """The appliance's publish; called from paho's thread too, so it does not wait."""
        props = None
        if properties and properties.get("content_type"):
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = properties["content_type"]
        return self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def publish_retained(self) -> None:
        t = self.topics
        self.publish(Topics().telemetry_metric("temperature_c"), "99", retain=True)  # the default base
        for metric, value in headline_values(FIGURES).items():
            self.publish(t.telemetry_metric(metric), value, retain=True)
        self.publish(t.status, "online", retain=True)
        self.publish(t.state, json.dumps(STATE), retain=True)
        self.publish(t.display("main"), PNG, retain=True, properties={"content_type": "image/png"})
        self.publish(t.queue, json.dumps(QUEUE), retain=True)
        self.publish(t.display_meta("main"), json.dumps(META), retain=True).wait_for_publish(5)

    def _on_request(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.requests.append(msg)
            self.cond.notify_all()
        route = route_reply(self.topics, "chat")
        Reply(self.publish, route, "someone-else").ok({"text": "not for this dashboard"})
        try:
            body = decode_payload(msg.payload)
            reply = Reply(self.publish, route, usable_id(body))
            prompt = ChatPayload.model_validate(body).prompt
        except PayloadError as exc:  # refused as the appliance would: the answer box shows why
            Reply(self.publish, route, exc.request_id).error(exc.code, exc.message)
        except ValidationError as exc:
            reply.error("bad_request", describe_validation(exc))
        else:
            if self.error:
                reply.error(*self.error)
            else:
                reply.ok({"text": f"You asked: {prompt}"}, text=f"You asked: {prompt}")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Dashboard:
    """What a browser on the dashboard sees and sends: Socket.IO over HTTP long-polling, the
    transport a browser starts with (the dashboard refuses a bare websocket)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/dashboard/socket.io/"
        self.sender = httpx.Client(timeout=10)
        self.reader = httpx.Client(timeout=60)
        opened = self.sender.get(self.url, params={"EIO": "4", "transport": "polling"}).text
        assert opened.startswith("0"), opened
        self.sid = json.loads(opened[1:])["sid"]
        self.events: list[tuple[str, list[Any]]] = []
        self.cond = threading.Condition()
        self.closed = False
        self._send("40")  # join the default namespace
        threading.Thread(target=self._read, daemon=True).start()

    def _params(self) -> dict[str, str]:
        return {"EIO": "4", "transport": "polling", "sid": self.sid}

    def _send(self, packet: str) -> None:
        self.sender.post(self.url, params=self._params(), content=packet).raise_for_status()

    def _read(self) -> None:
        while not self.closed:
            try:
                body = self.reader.get(self.url, params=self._params()).text
            except httpx.HTTPError:
                return
            for packet in body.split("\x1e"):
                if packet == "2":
                    self._send("3")  # pong
                elif packet.startswith("42"):
                    name, *args = json.loads(packet[2:])
                    with self.cond:
                        self.events.append((name, args))
                        self.cond.notify_all()
                elif packet.startswith("1"):
                    return

    def emit(self, event: str, *args: Any) -> None:
        self._send("42" + json.dumps([event, *args]))

    def shown(self, widget: dict[str, Any]) -> list[dict[str, Any]]:
        """Every message the widget was sent, oldest first."""
        with self.cond:
            return [args[0] for name, args in self.events if name == f"msg-input:{widget['id']}"]

    def config(self) -> dict[str, Any]:
        with self.cond:
            configs = [args[1] for name, args in self.events if name == "ui-config"]
        assert configs, "the dashboard sent no ui-config"
        return configs[-1]

    def settle(self, predicate: Callable[[], bool], timeout: float = 20) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
        assert self.settle(predicate, timeout), f"timed out waiting for {what}"

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(httpx.HTTPError):
            self._send("41")
        self.sender.close()


@dataclass
class Running:
    flow: list[dict[str, Any]]
    log: Path
    appliance: FakeAppliance
    dashboard: Dashboard

    def widget(self, kind: str, name: str) -> dict[str, Any]:
        return named(self.flow, kind, name)


def settings_js(port: int) -> str:
    return f"""module.exports = {{
    uiHost: "127.0.0.1", uiPort: {port}, flowFile: "flows.json", credentialSecret: "flow-test",
    telemetry: {{ enabled: false }}, diagnostics: {{ enabled: false }},
    externalModules: {{ autoInstall: false, palette: {{ allowInstall: false }} }},
    logging: {{ console: {{ level: "info", metrics: false, audit: false }} }},
}};
"""


def with_settings(flow: list[dict[str, Any]], broker_port: int) -> list[dict[str, Any]]:
    """The flow as a user sets it up: only the tab's environment changed (the password is a
    credential of the tab, as the editor keeps it)."""
    values = {"BROKER_HOST": "127.0.0.1", "BROKER_PORT": str(broker_port), "BROKER_USER": "dashboard",
              "BASE_TOPIC": BASE}
    out = json.loads(json.dumps(flow))
    for node in out:
        if node["type"] == "tab":
            for entry in node["env"]:
                entry["value"] = values.get(entry["name"], entry["value"])
            node["credentials"] = {"BROKER_PASSWORD": USERS["dashboard"]}
    return out


def node_problems(log: str) -> list[str]:
    """The lines of Node-RED's log that say a node, or the flow, went wrong."""
    bad = re.compile(r"\[(?:error|warn)\] \[|Circular|No group configured|missing types|Error:")
    return [line for line in log.splitlines() if bad.search(line)]


def wait_for_log(log: Path, pattern: str, proc: subprocess.Popen[bytes], since: int = 0,
                 timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, log.read_text()[since:]):
        assert proc.poll() is None, f"Node-RED exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern!r} in Node-RED's log:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    red = node_red_or_skip()
    broker = LoginBroker(tmp_path_factory.mktemp("broker"), USERS).start()
    appliance = FakeAppliance(broker.port, USERS["appliance"])
    user_dir = tmp_path_factory.mktemp("node-red")
    port = free_port()
    (user_dir / "settings.js").write_text(settings_js(port))
    (user_dir / "flows.json").write_text("[]")
    log = user_dir / "node-red.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["node", str(red), "--userDir", str(user_dir), "--settings",
                                 str(user_dir / "settings.js")], stdout=out, stderr=out)
    dashboard = None
    try:
        admin = f"http://127.0.0.1:{port}"
        wait_for_log(log, r"Started flows", proc)
        flow, since = nodes(), len(log.read_text())
        deployed = httpx.post(f"{admin}/flows", json=with_settings(flow, broker.port), timeout=30,
                              headers={"Node-RED-Deployment-Type": "full", "Node-RED-API-Version": "v1"})
        assert deployed.status_code == 204, deployed.text
        wait_for_log(log, r"Started flows", proc, since)
        if problems := node_problems(log.read_text()):
            pytest.fail("Node-RED did not start the flow cleanly:\n" + "\n".join(problems))
        wait_for_log(log, rf"Connected to broker: mqtt://127\.0\.0\.1:{broker.port}", proc, since)
        dashboard = Dashboard(port)
        appliance.publish_retained()
        yield Running(flow, log, appliance, dashboard)
    finally:
        if dashboard is not None:
            dashboard.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        appliance.close()
        broker.stop()


def test_the_dashboard_has_every_widget_in_its_group_on_the_page(running: Running) -> None:
    dash = running.dashboard
    widgets = [n for n in running.flow if n["type"] in DASHBOARD and "group" in n]
    dash.wait(lambda: any(name == "ui-config" for name, _ in dash.events), "the dashboard's ui-config")
    config = dash.config()
    (base,) = [n for n in running.flow if n["type"] == "ui-base"]
    (page,) = [n for n in running.flow if n["type"] == "ui-page"]
    (theme,) = [n for n in running.flow if n["type"] == "ui-theme"]
    assert set(config["widgets"]) == {w["id"] for w in widgets}
    for widget in widgets:
        group = config["groups"][config["widgets"][widget["id"]]["props"]["group"]]
        assert group["id"] == widget["group"] and group["page"] == page["id"], widget["name"]
    assert config["pages"][page["id"]]["ui"] == base["id"]
    assert config["pages"][page["id"]]["theme"] == theme["id"] and theme["id"] in config["themes"]


def test_every_widget_shows_its_topic_under_the_base_topic(running: Running) -> None:
    dash, w = running.dashboard, running.widget
    expected: list[tuple[dict[str, Any], Callable[[dict[str, Any]], Any], Any]] = [
        (w("ui-gauge", "NPU temperature"), lambda m: m["payload"], 61.5),
        (w("ui-gauge", "NPU load"), lambda m: m["payload"], 37),
        (w("ui-text", "CMM free (MiB)"), lambda m: m["payload"], 812),
        (w("ui-chart", "Tokens per second"), lambda m: m["_datapoint"]["y"], 12.5),
        (w("ui-chart", "Queue depth"), lambda m: m["_datapoint"]["y"], 2),
        (w("ui-text", "Status"), lambda m: m["payload"], "online"),
        (w("ui-text", "State"), lambda m: m["payload"], "busy: 1 running, 2 waiting"),
        (w("ui-text", "Queue"), lambda m: m["payload"], "2 waiting, a new prompt starts in about 4 s"),
        (w("ui-template", "latest image"), lambda m: m["payload"],
         "data:image/png;base64," + base64.b64encode(PNG).decode()),
        (w("ui-text", "Image prompt"), lambda m: m["payload"],
         "a lighthouse in a storm at night (seed 42, 4 steps)"),
    ]
    dash.settle(lambda: all(dash.shown(widget) for widget, _, _ in expected))
    shown = {widget["name"]: [value(m) for m in dash.shown(widget)] for widget, value, _ in expected}
    assert shown == {widget["name"]: [want] for widget, _, want in expected}


def ask(running: Running, prompt: str) -> tuple[mqtt.MQTTMessage, list[Any]]:
    """Submit the form as the browser does; the request published and what the answer box showed."""
    dash, fake = running.dashboard, running.appliance
    # The caption is fed by the last subscription: once it is shown, the answers are subscribed.
    dash.wait(lambda: bool(dash.shown(running.widget("ui-text", "Image prompt"))), "the flow's subscriptions")
    answer = running.widget("ui-text", "Answer")
    before, asked = len(dash.shown(answer)), len(fake.requests)
    dash.emit("widget-action", running.widget("ui-form", "Prompt")["id"],
              {"payload": {"prompt": prompt}, "_event": "submit"})
    dash.wait(lambda: len(dash.shown(answer)) >= before + 2, "the answer")
    with fake.cond:
        assert len(fake.requests) == asked + 1
        request = fake.requests[-1]
    return request, [m["payload"] for m in dash.shown(answer)[before:]]


def test_the_prompt_form_asks_on_request_chat_and_shows_its_own_answer(running: Running) -> None:
    request, shown = ask(running, "Describe the room in one sentence.")
    assert request.topic == Topics(BASE).request("chat")
    payload = ChatPayload.model_validate(decode_payload(request.payload))
    assert payload.prompt == "Describe the room in one sentence." and isinstance(payload.id, str)
    # someone else's answer on the shared topic came first, and is not shown
    assert shown == ["Waiting for the answer...", "You asked: Describe the room in one sentence."]


def test_an_error_reply_shows_its_message(running: Running) -> None:
    running.appliance.error = ("busy", "the queue is full, try again in 2 s")
    try:
        _, shown = ask(running, "Name a colour.")
    finally:
        running.appliance.error = None
    assert shown == ["Waiting for the answer...", "error: the queue is full, try again in 2 s"]


def test_the_picture_in_progress_shows_each_preview_as_it_comes(running: Running) -> None:
    dash, fake = running.dashboard, running.appliance
    dash.wait(lambda: bool(dash.shown(running.widget("ui-text", "Image prompt"))), "the flow's subscriptions")
    progress = running.widget("ui-template", "picture in progress")
    assert dash.shown(progress) == [], "previews are not retained: nothing before a picture is made"
    topic = fake.topics.display_preview("main")
    for step in range(2):
        fake.publish(topic, JPEG + bytes([step]), qos=0, properties={"content_type": "image/jpeg"})
        dash.wait(lambda n=step: len(dash.shown(progress)) == n + 1, f"preview {step + 1}")
    shown = [m["payload"] for m in dash.shown(progress)]
    sent = [JPEG + bytes([s]) for s in range(2)]
    assert shown == ["data:image/jpeg;base64," + base64.b64encode(data).decode() for data in sent]


def test_node_red_ran_it_without_a_node_error(running: Running) -> None:
    """Runs after the others: nothing they did made a node complain either."""
    log = running.log.read_text()
    assert "Started flows" in log and node_problems(log) == []
