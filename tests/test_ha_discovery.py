"""Home Assistant discovery: the payload's shape, its templates as HA renders them, and re-sending."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import jinja2
import pytest
from mqtt_client import Client, write_config
from pydantic import ValidationError

from appliance.app import Appliance
from appliance.config import load_config
from appliance.ha_discovery import DiscoveryPayload, build_discovery, discovery_changed, node_id_for
from appliance.topics import Topics

TOPICS = Topics("gallery/north")


def render(template: str, value: str) -> str:
    """What HA does with a value_template: ``value`` is the payload, ``value_json`` its JSON."""
    try:
        value_json = json.loads(value)
    except ValueError:
        value_json = None
    return jinja2.Template(template).render(value=value, value_json=value_json).strip()


def test_topic_ids_and_platforms() -> None:
    topic, payload = build_discovery(TOPICS, version="1.2.3", model_ids=["smollm2"])
    assert topic == "homeassistant/device/gallery_north/config" and node_id_for("a b/c#") == "a_b_c"
    device = payload["device"]
    assert device["identifiers"] == ["gallery_north"] and device["sw_version"] == "1.2.3"
    comps = payload["components"]
    for object_id, comp in comps.items():
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", comp["unique_id"])
        assert comp["unique_id"] == f"gallery_north_{object_id}"
    platforms = {c["platform"] for c in comps.values()}
    assert platforms == {"sensor", "binary_sensor", "button", "switch", "text"}
    assert comps["temperature_c"]["state_topic"] == "gallery/north/telemetry/temperature_c"
    temperature = comps["temperature_c"]
    assert temperature["device_class"] == "temperature" and temperature["unit_of_measurement"] == "°C"
    for metric in ("cmm_free_mib", "npu_load_pct", "queue_depth", "tokens_per_s"):
        assert comps[metric]["state_topic"] == f"gallery/north/telemetry/{metric}"
    assert comps["restart"]["command_topic"] == "gallery/north/request/restart"
    assert comps["paused"]["command_topic"] == "gallery/north/request/pause"
    assert comps["prompt"]["command_topic"] == "gallery/north/request/chat" and comps["prompt"]["max"] == 255
    assert payload["availability"][0]["topic"] == "gallery/north/status"
    json.dumps(payload)
    assert "picture" not in comps, "no image entity without an image model"
    _, with_images = build_discovery(TOPICS, version="1", model_ids=["sd"], display="lobby")
    picture = with_images["components"]["picture"]
    assert picture["platform"] == "image" and picture["image_topic"] == "gallery/north/display/lobby"
    assert picture["content_type"] == "image/png"
    assert with_images["components"]["picture_prompt"]["command_topic"] == "gallery/north/request/image"


def test_templates_render_as_home_assistant_would() -> None:
    _, payload = build_discovery(TOPICS, version="1", model_ids=[])
    comps = payload["components"]
    switch = comps["paused"]["value_template"]
    assert render(switch, '{"state": "paused"}') == "ON" and render(switch, '{"state": "idle"}') == "OFF"
    status = comps["status"]["value_template"]
    assert [render(status, v) for v in ("online", "offline", "stopped")] == ["online", "offline", "offline"]
    avail = payload["availability"][0]
    assert render(avail["value_template"], "stopped") == avail["payload_not_available"]
    assert render(comps["state"]["value_template"], '{"state": "recovering"}') == "recovering"
    assert json.loads(comps["paused"]["payload_off"]) == {"paused": False}


def test_the_schema_refuses_unknown_keys_and_changes_are_detected() -> None:
    _, payload = build_discovery(TOPICS, version="1", model_ids=["a"])
    DiscoveryPayload.model_validate(payload)
    with pytest.raises(ValidationError):
        DiscoveryPayload.model_validate({**payload, "componentz": {}})
    assert not discovery_changed(payload, build_discovery(TOPICS, version="1", model_ids=["a"])[1])
    assert discovery_changed(payload, build_discovery(TOPICS, version="2", model_ids=["a"])[1])
    assert discovery_changed(None, payload)


def test_discovery_is_retained_and_resent_when_home_assistant_restarts(  # type: ignore[no-untyped-def]
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,
) -> None:
    path = write_config(tmp_path, mqtt_broker.port, mqtt_base_topic, demo_bundle_fp32,
                        device={"backend": "sim"}, homeassistant={"name": "Test room"})
    app = Appliance(load_config(path, env={}))
    app.start()
    ha = Client(mqtt_broker.port)
    topic = f"homeassistant/device/{node_id_for(mqtt_base_topic)}/config"
    try:
        for worker in app.engine.workers:
            assert worker.loaded.wait(60)
        ha.subscribe(topic)
        ha.wait(lambda: bool(ha.messages[topic]))
        first = ha.messages[topic][0]
        assert first.retain and json.loads(first.payload)["device"]["name"] == "Test room"
        ha.publish("homeassistant/status", "online")
        ha.wait(lambda: len(ha.messages[topic]) >= 2)
        assert json.loads(ha.messages[topic][-1].payload) == json.loads(first.payload)
        comps = json.loads(first.payload)["components"]
        switch = comps["paused"]
        for payload, expected in ((switch["payload_on"], "paused"), (switch["payload_off"], "idle")):
            ha.publish(switch["command_topic"], payload)  # what the HA switch sends
            deadline = time.monotonic() + 10
            while app.engine.state().state != expected and time.monotonic() < deadline:
                time.sleep(0.05)
            assert app.engine.state().state == expected
    finally:
        ha.close()
        app.stop()
