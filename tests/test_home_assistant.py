"""The discovery in a real Home Assistant: what an installer sees there, through HA's REST API.

Home Assistant (``homeassistant`` from PyPI, in its own venv ``.cache/homeassistant``, which
``./scripts/test``'s set-up makes with a Python 3.13 or newer) starts once for the module, with
its MQTT integration's config entry written into its config folder before the start and pointed
at this module's Mosquitto. Its owner is made through HA's onboarding API, whose token then
reads states and calls services. The appliance is started, stopped and started again with other
configs against the same HA: the device and every entity exist with live states; the connectivity
sensor turns ``off`` when the appliance stops; the pause switch, the restart button and the prompt
box reach the appliance at QoS 1; the picture entity shows the display's latest picture; taking
the image model out of the config removes its two entities; the scene select shows and switches
the scene and leaves with the scenes; turning discovery off removes the device. The module takes
about 35 s on 2 cores (HA starts in under 10 s); the set-up's first
install of Home Assistant about 75 s more.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
import yaml
from mqtt_broker import free_port, port_open
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import load_config

ROOT = Path(__file__).resolve().parents[1]
HA_VENV = ROOT / ".cache/homeassistant"  # scripts/lib/setup.sh (ensure_home_assistant) makes it
HASS = HA_VENV / "bin/hass"
BASE = "gallery"
NAME = "Gallery"  # homeassistant.name: HA names the device and prefixes each entity id with it
# entity id -> what HA shows once the appliance runs (None: any live state)
ENTITIES: dict[str, str | None] = {
    "sensor.gallery_npu_temperature": None,
    "sensor.gallery_npu_memory_free": None,
    "sensor.gallery_npu_load": None,
    "sensor.gallery_queue_depth": "0",
    "sensor.gallery_tokens_per_second": None,
    "sensor.gallery_state": "idle",
    "binary_sensor.gallery_status": "on",
    "switch.gallery_paused": "off",
    "button.gallery_restart": None,
    "text.gallery_prompt": None,
}
PICTURE = {"image.gallery_picture": None, "text.gallery_picture_prompt": None}
SCENES = ["opening", "night"]
GONE = "gone"  # what `state` returns for an entity HA does not have


def python_313() -> str | None:
    """A Python 3.13 or newer, looked for where the set-up looks (PATH, pyenv, Debian's)."""
    pyenv = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    pyenvs = sorted(glob.glob(f"{pyenv}/versions/3.1[3-9]*/bin/python3"))
    for candidate in ("python3.13", "python3.14", *pyenvs, "/usr/bin/python3.13"):
        exe = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
        if exe and subprocess.run([exe, "-c", "import sys; sys.exit(sys.version_info < (3, 13))"],
                                  capture_output=True, check=False).returncode == 0:
            return exe
    return None


def hass_or_skip() -> Path:
    if HASS.is_file() and (HA_VENV / ".installed").is_file():  # the stamp: the install finished
        return HASS
    if python_313() is None:
        pytest.skip(f"no Python 3.13 or newer here (this is {sys.version.split()[0]}): "
                    "Home Assistant needs one")
    pytest.fail(f"Home Assistant is not installed in {HA_VENV}: "
                "run ./scripts/test once (its set-up installs it)")


def mqtt_config_entry(broker_port: int) -> dict[str, Any]:
    """``.storage/core.config_entries`` with one MQTT entry, as HA's config flow writes it."""
    now = "2025-01-01T00:00:00+00:00"
    entry = {
        "created_at": now, "modified_at": now, "data": {"broker": "127.0.0.1", "port": broker_port},
        "disabled_by": None, "discovery_keys": {}, "domain": "mqtt", "entry_id": uuid.uuid4().hex,
        "minor_version": 2, "version": 1,
        "options": {"discovery": True, "discovery_prefix": "homeassistant",
                    "birth_message": {"topic": "homeassistant/status", "payload": "online", "qos": 0,
                                      "retain": False},
                    "will_message": {"topic": "homeassistant/status", "payload": "offline", "qos": 0,
                                     "retain": False}},
        "pref_disable_new_entities": False, "pref_disable_polling": False, "source": "user",
        "subentries": [], "title": "127.0.0.1", "unique_id": None,
    }
    return {"version": 1, "minor_version": 5, "key": "core.config_entries", "data": {"entries": [entry]}}


class HomeAssistant:
    """One ``hass`` process on a loopback port, and an owner's token for its REST API."""

    def __init__(self, config_dir: Path, broker_port: int) -> None:
        self.dir = config_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (config_dir / ".storage").mkdir(parents=True)
        (config_dir / ".storage/core.config_entries").write_text(json.dumps(mqtt_config_entry(broker_port)))
        # Loopback only: HA's mDNS resolver (zeroconf) then joins no multicast group on a real network.
        (config_dir / ".storage/core.network").write_text(json.dumps({
            "version": 1, "minor_version": 1, "key": "core.network",
            "data": {"configured_adapters": ["lo"]}}))
        (config_dir / "configuration.yaml").write_text(yaml.safe_dump({
            "homeassistant": {"name": "Test", "unit_system": "metric", "time_zone": "UTC", "latitude": 0,
                              "longitude": 0, "elevation": 0, "currency": "EUR", "country": "DE",
                              "language": "en"},
            "http": {"server_host": "127.0.0.1", "server_port": self.port},
            "api": {},
            "logger": {"default": "warning", "logs": {"homeassistant.components.mqtt": "info"}},
        }))
        self.log = config_dir / "hass.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def start(self, timeout: float = 240) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([str(HASS), "--config", str(self.dir), "--skip-pip"],
                                         stdout=log, stderr=subprocess.STDOUT)
        self.until(lambda: port_open(self.port) and self.http.get("/api/onboarding").status_code == 200,
                   timeout, "Home Assistant's HTTP server")
        client_id = f"{self.url}/"
        made = self.http.post("/api/onboarding/users", json={
            "client_id": client_id, "name": "Installer", "username": "installer",
            "password": "gallery-installer-1", "language": "en"})
        assert made.status_code == 200, made.text
        token = self.http.post("/auth/token", data={
            "grant_type": "authorization_code", "code": made.json()["auth_code"], "client_id": client_id})
        assert token.status_code == 200, token.text
        self.http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        self.until(lambda: self.http.get("/api/").status_code == 200, 30, "the REST API")

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def until(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = check()
            except httpx.HTTPError:
                result = None
            if result:
                return result
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"Home Assistant exited ({self.proc.returncode}): {self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; Home Assistant's log ends:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def state(self, entity_id: str) -> str:
        got = self.http.get(f"/api/states/{entity_id}")
        if got.status_code == 404:
            return GONE
        got.raise_for_status()
        return str(got.json()["state"])

    def template(self, text: str) -> str:
        got = self.http.post("/api/template", json={"template": text})
        got.raise_for_status()
        return got.text.strip()

    def device_entities(self, entity_id: str) -> list[str]:
        """The entity ids of the device ``entity_id`` belongs to, from HA's device registry."""
        return json.loads(self.template(
            f"{{{{ device_entities(device_id('{entity_id}')) | sort | tojson }}}}"))

    def call(self, domain: str, service: str, **data: Any) -> None:
        got = self.http.post(f"/api/services/{domain}/{service}", json=data)
        assert got.status_code == 200, got.text

    def wait_states(self, expected: dict[str, str | None], timeout: float = 60) -> None:
        def matches() -> bool:
            for entity_id, want in expected.items():
                got = self.state(entity_id)
                if (got != want) if want is not None else got in (GONE, "unavailable"):
                    return False
            return True
        try:
            self.until(matches, timeout, f"states {expected}")
        except pytest.fail.Exception:
            seen = {e: self.state(e) for e in expected}
            raise AssertionError(f"states in HA: {seen}\n{self.tail()}") from None


@pytest.fixture(scope="module")
def ha(mqtt_broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeAssistant]:  # type: ignore[no-untyped-def]
    hass_or_skip()
    home = HomeAssistant(tmp_path_factory.mktemp("home-assistant"), mqtt_broker.port)
    started = time.monotonic()
    try:
        home.start()
        print(f"Home Assistant up in {time.monotonic() - started:.1f} s")
        yield home
    finally:
        home.stop()


class Stack:
    """The appliance against the module's broker and HA, started again with another config on demand."""

    def __init__(self, broker_port: int, tmp: Path, models: dict[str, Path]) -> None:
        self.port, self.tmp, self.models = broker_port, tmp, models
        self.app: Appliance | None = None
        self.over: dict[str, Any] | None = None

    def run(self, *, image_model: bool = True, discovery: bool = True, scenes: bool = False) -> Appliance:
        over: dict[str, Any] = {
            "models": [{"id": "demo", "kind": "chat", "path": str(self.models["demo"]), "runtime": "onnx"}],
            "device": {"backend": "sim", "health_interval": 0.5},
            "telemetry": {"interval": 1},
            "images": {"display": "lobby", "format": "png"},
            "homeassistant": {"name": NAME, "enabled": discovery},
        }
        if scenes:  # by request only (no start): the first is current at start-up
            over["scenes"] = [{"name": name} for name in SCENES]
        if image_model:
            over["models"].append(
                {"id": "sd", "kind": "image", "path": str(self.models["sd"]), "runtime": "onnx"})
        if self.app is not None and over == self.over:
            return self.app
        self.stop()
        path = write_config(self.tmp, self.port, BASE, self.models["demo"], **over)
        app = Appliance(load_config(path, env={}))
        app.start()
        assert app.engine.wait_loaded(120) and app.link.subscribed.wait(30)
        self.app, self.over = app, over
        return app

    def stop(self) -> None:
        if self.app is not None:
            self.app.stop()
        self.app = None


@pytest.fixture(scope="module")
def stack(mqtt_broker, tmp_path_factory: pytest.TempPathFactory, demo_bundle_fp32: Path,  # type: ignore[no-untyped-def]
          sd_bundle: Path) -> Iterator[Stack]:
    s = Stack(mqtt_broker.port, tmp_path_factory.mktemp("appliance"),
              {"demo": demo_bundle_fp32, "sd": sd_bundle})
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def sniffer(mqtt_broker) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    """Hears what HA sends the appliance, subscribed at QoS 1 (so it gets each message at HA's QoS)."""
    c = Client(mqtt_broker.port)
    c.subscribe(f"{BASE}/request/#", f"{BASE}/response/#", f"{BASE}/display/lobby")
    try:
        yield c
    finally:
        c.close()


def received(c: Client, topic: str, timeout: float = 30) -> mqtt.MQTTMessage:
    c.wait(lambda: bool(c.messages[topic]), timeout)
    return c.messages[topic][-1]


def test_the_device_and_every_entity_appear_with_live_states(ha: HomeAssistant, stack: Stack) -> None:
    stack.run()
    ha.wait_states({**ENTITIES, **PICTURE})
    assert ha.device_entities("binary_sensor.gallery_status") == sorted({**ENTITIES, **PICTURE})
    device = "device_id('binary_sensor.gallery_status')"
    assert ha.template(f"{{{{ device_attr({device}, 'name') }}}}") == NAME
    assert ha.template(f"{{{{ device_attr({device}, 'manufacturer') }}}}") == "appliance"
    temperature = ha.http.get("/api/states/sensor.gallery_npu_temperature").json()
    assert float(temperature["state"]) > 0 and temperature["attributes"]["unit_of_measurement"] == "°C"
    assert temperature["attributes"]["device_class"] == "temperature"


def test_the_switch_the_button_and_the_prompt_box_reach_the_appliance_at_qos_1(
    ha: HomeAssistant, stack: Stack, sniffer: Client,
) -> None:
    app = stack.run()
    ha.wait_states(ENTITIES)
    ha.call("switch", "turn_on", entity_id="switch.gallery_paused")
    assert received(sniffer, f"{BASE}/request/pause").qos == 1
    ha.wait_states({"switch.gallery_paused": "on", "sensor.gallery_state": "paused"})
    assert app.engine.state().state == "paused"
    ha.call("switch", "turn_off", entity_id="switch.gallery_paused")
    ha.wait_states({"switch.gallery_paused": "off", "sensor.gallery_state": "idle"})

    ha.call("button", "press", entity_id="button.gallery_restart")
    assert received(sniffer, f"{BASE}/request/restart").qos == 1
    assert json.loads(received(sniffer, f"{BASE}/response/restart").payload)["status"] == "ok"

    ha.call("text", "set_value", entity_id="text.gallery_prompt", value="Say hello.")
    prompt = received(sniffer, f"{BASE}/request/chat")
    assert prompt.qos == 1 and prompt.payload == b"Say hello."
    assert json.loads(received(sniffer, f"{BASE}/response/chat", 120).payload)["status"] == "ok"


def test_the_picture_entity_shows_the_latest_picture_of_its_display(
    ha: HomeAssistant, stack: Stack, sniffer: Client,
) -> None:
    stack.run()
    ha.wait_states(PICTURE)
    ha.call("text", "set_value", entity_id="text.gallery_picture_prompt", value="a lighthouse at night")
    assert received(sniffer, f"{BASE}/request/image").qos == 1
    reply = json.loads(received(sniffer, f"{BASE}/response/image", 120).payload)
    assert reply["status"] == "ok", reply
    picture = received(sniffer, f"{BASE}/display/lobby").payload
    assert picture[:8] == b"\x89PNG\r\n\x1a\n"

    def shown(content_type: str) -> bool:
        got = ha.http.get("/api/image_proxy/image.gallery_picture")
        return (got.status_code == 200 and got.content == picture
                and got.headers["content-type"] == content_type)
    ha.until(lambda: shown("image/png"), 30, "the picture in HA")
    # A request may ask for JPEG: HA then serves that picture as JPEG.
    sniffer.messages[f"{BASE}/display/lobby"].clear()
    sniffer.publish(f"{BASE}/request/image", {"id": "j1", "prompt": "a harbour", "format": "jpeg"})
    picture = received(sniffer, f"{BASE}/display/lobby", 120).payload
    assert picture[:3] == b"\xff\xd8\xff"
    ha.until(lambda: shown("image/jpeg"), 30, "the JPEG picture in HA")


def test_the_scene_select_shows_and_switches_the_scene_and_leaves_with_the_scenes(
    ha: HomeAssistant, stack: Stack, sniffer: Client,
) -> None:
    stack.run(scenes=True)
    ha.wait_states({"select.gallery_scene": "opening"})
    assert ha.http.get("/api/states/select.gallery_scene").json()["attributes"]["options"] == SCENES
    ha.call("select", "select_option", entity_id="select.gallery_scene", option="night")
    request = received(sniffer, f"{BASE}/request/scene")
    assert request.qos == 1 and request.payload == b"night"
    ha.wait_states({"select.gallery_scene": "night"})
    stack.run()
    ha.wait_states({"select.gallery_scene": GONE, **ENTITIES})


def test_the_connectivity_sensor_turns_off_when_the_appliance_stops(ha: HomeAssistant, stack: Stack) -> None:
    stack.run()
    ha.wait_states({"binary_sensor.gallery_status": "on"})
    stack.stop()
    ha.wait_states({"binary_sensor.gallery_status": "off", "sensor.gallery_state": "unavailable",
                    "switch.gallery_paused": "unavailable"})
    stack.run()
    ha.wait_states({"binary_sensor.gallery_status": "on", "sensor.gallery_state": "idle"})


def test_taking_the_image_model_out_removes_its_entities(ha: HomeAssistant, stack: Stack) -> None:
    stack.run()
    ha.wait_states(PICTURE)
    stack.run(image_model=False)
    ha.wait_states(dict.fromkeys(PICTURE, GONE))
    ha.wait_states(ENTITIES)
    assert ha.device_entities("binary_sensor.gallery_status") == sorted(ENTITIES)


def test_turning_discovery_off_removes_the_device(ha: HomeAssistant, stack: Stack) -> None:
    stack.run()
    ha.wait_states(ENTITIES)
    device = ha.template("{{ device_id('binary_sensor.gallery_status') }}")
    stack.run(discovery=False)
    ha.wait_states(dict.fromkeys({**ENTITIES, **PICTURE}, GONE))
    assert ha.template(f"{{{{ device_attr('{device}', 'name') }}}}") == "None"


def test_the_set_up_says_why_the_test_is_skipped_where_no_python_313_exists(tmp_path: Path) -> None:
    """No 3.13 on PATH, no pyenv: ensure_home_assistant says so, installs nothing and succeeds."""
    if Path("/usr/bin/python3.13").exists():
        pytest.skip("this machine has Debian's python3.13, so the set-up would use it")
    script = f'source "{ROOT}/scripts/lib/setup.sh"; HA_DIR="{tmp_path}/ha"; ensure_home_assistant'
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert "no Python 3.13 or newer here: the Home Assistant test will be skipped" in done.stderr
    assert not (tmp_path / "ha").exists()
