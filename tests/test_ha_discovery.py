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
from appliance.ha_discovery import (
    OPTIONAL_COMPONENTS,
    DiscoveryPayload,
    build_discovery,
    clear_discovery,
    discovery_changed,
    node_id_for,
)
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
    comps = {k: c for k, c in payload["components"].items() if k not in OPTIONAL_COMPONENTS}
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
    assert payload["components"]["picture"] == {"platform": "image"}, "no image entity without an image model"
    _, with_images = build_discovery(TOPICS, version="1", model_ids=["sd"], display="lobby")
    picture = with_images["components"]["picture"]
    assert picture["platform"] == "image" and picture["image_topic"] == "gallery/north/display/lobby"
    assert picture["content_type"] == "image/png"
    assert with_images["components"]["picture_prompt"]["command_topic"] == "gallery/north/request/image"


def test_every_component_runs_at_qos_1_and_the_connectivity_sensor_has_no_availability() -> None:
    """HA copies neither the device's qos nor, once a component sets its own, the availability."""
    _, payload = build_discovery(TOPICS, version="1", model_ids=["sd"], display="lobby", scenes=["day"])
    assert "qos" not in payload, "HA ignores a device-level qos"
    for object_id, comp in payload["components"].items():
        assert comp["qos"] == 1, object_id
        assert ("availability" in comp) == (object_id == "status"), object_id
    assert payload["components"]["status"]["availability"] == []
    assert payload["components"]["status"]["device_class"] == "connectivity"


def test_components_an_installation_lacks_are_sent_platform_only_so_home_assistant_removes_them() -> None:
    _, full = build_discovery(TOPICS, version="1", model_ids=["sd"], display="lobby", scenes=["day", "night"])
    _, bare = build_discovery(TOPICS, version="1", model_ids=[])
    assert set(full["components"]) == set(bare["components"]), "the same object ids either way"
    optional = {k for k, c in bare["components"].items() if set(c) == {"platform"}}
    assert optional == set(OPTIONAL_COMPONENTS) == {"picture", "picture_prompt", "scene"}
    for object_id in optional:
        assert bare["components"][object_id]["platform"] == full["components"][object_id]["platform"]
        assert "unique_id" in full["components"][object_id]
    DiscoveryPayload.model_validate(bare)
    assert clear_discovery(TOPICS) == ("homeassistant/device/gallery_north/config", "")


def test_scenes_are_a_select_that_shows_and_switches_the_scene() -> None:
    _, payload = build_discovery(TOPICS, version="1", model_ids=[], scenes=["opening", "night"])
    select = payload["components"]["scene"]
    assert select["platform"] == "select" and select["options"] == ["opening", "night"]
    assert select["command_topic"] == "gallery/north/request/scene"  # HA sends the option as plain text
    assert select["state_topic"] == "gallery/north/scene"
    assert select["value_template"] == "{{ value_json.scene }}"


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
                        device={"backend": "sim"},
                        homeassistant={"name": "Test room", "birth_payload": "ha-up"})
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
        ha.publish("homeassistant/status", "online")  # not this HA's birth payload: nothing
        ha.publish("homeassistant/status", "ha-up")
        ha.wait(lambda: len(ha.messages[topic]) >= 2)
        time.sleep(0.5)
        assert len(ha.messages[topic]) == 2, "only the configured birth payload asks again"
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


def test_the_picture_entity_takes_the_content_type_of_the_latest_picture(  # type: ignore[no-untyped-def]
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path, sd_bundle: Path,
) -> None:
    models = [{"id": "demo", "kind": "chat", "path": str(demo_bundle_fp32), "runtime": "onnx"},
              {"id": "sd", "kind": "image", "path": str(sd_bundle), "runtime": "onnx"}]
    path = write_config(tmp_path, mqtt_broker.port, mqtt_base_topic, demo_bundle_fp32, models=models,
                        images={"display": "lobby", "format": "png"})
    app = Appliance(load_config(path, env={}))
    app.start()
    ha = Client(mqtt_broker.port)
    topic = f"homeassistant/device/{node_id_for(mqtt_base_topic)}/config"
    try:
        ha.subscribe(topic, f"{mqtt_base_topic}/response/image")
        ha.wait(lambda: bool(ha.messages[topic]))
        first = json.loads(ha.messages[topic][-1].payload)["components"]["picture"]
        assert first["content_type"] == "image/png"
        assert app.link.subscribed.wait(60)
        ha.publish(f"{mqtt_base_topic}/request/image",
                   {"id": "j1", "prompt": "a lighthouse", "format": "jpeg", "steps": 1})
        ha.wait(lambda: len(ha.messages[topic]) >= 2)
        picture = json.loads(ha.messages[topic][-1].payload)["components"]["picture"]
        assert picture["content_type"] == "image/jpeg"
        assert picture["image_topic"] == f"{mqtt_base_topic}/display/lobby"
        assert ha.json(f"{mqtt_base_topic}/response/image")[0]["status"] == "ok"
    finally:
        ha.close()
        app.stop()


def test_turning_discovery_off_removes_the_retained_config(  # type: ignore[no-untyped-def]
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,
) -> None:
    """An empty retained config is how HA removes a whole device; it also clears the broker's copy."""
    topic = f"homeassistant/device/{node_id_for(mqtt_base_topic)}/config"
    _, old = build_discovery(Topics(mqtt_base_topic), version="0", model_ids=["demo"])
    ha = Client(mqtt_broker.port)
    try:
        ha.c.publish(topic, json.dumps(old), qos=1, retain=True).wait_for_publish(5)
        ha.subscribe(topic)
        ha.wait(lambda: bool(ha.messages[topic]))  # the retained config of an earlier run
        path = write_config(tmp_path, mqtt_broker.port, mqtt_base_topic, demo_bundle_fp32,
                            device={"backend": "sim"}, homeassistant={"enabled": False})
        app = Appliance(load_config(path, env={}))
        app.start()
        try:
            ha.wait(lambda: len(ha.messages[topic]) >= 2)
            assert ha.messages[topic][-1].payload == b""
        finally:
            app.stop()
        late = Client(mqtt_broker.port)
        try:
            late.subscribe(topic)
            time.sleep(0.5)
            assert not late.messages[topic], "nothing retained is left"
        finally:
            late.close()
    finally:
        ha.close()
