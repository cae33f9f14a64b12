"""Health, telemetry and recovery end to end: the sim card (and a simulated pyaxcl card), a real
Mosquitto, real subscribers."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_axcl import SMI, install
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import load_config


@pytest.fixture
def sim_app(  # type: ignore[no-untyped-def]
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,
) -> Iterator:  # type: ignore[type-arg]
    apps: list[Appliance] = []

    def start(**over: Any) -> Appliance:
        device = {"backend": "sim", "health_interval": 0.2,
                  "recovery": {"attempts": 2, "backoff": 0.1}, **over.pop("device", {})}
        path = write_config(tmp_path, mqtt_broker.port, mqtt_base_topic, demo_bundle_fp32,
                            device=device, engine={"step_timeout": 1.0, "max_active": 1},
                            telemetry={"interval": 1}, **over)
        app = Appliance(load_config(path, env={}))
        app.start()
        for worker in app.engine.workers:
            assert worker.loaded.wait(60)
        assert app.link.subscribed.wait(10)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


def test_telemetry_reaches_a_subscriber_as_json_and_bare_numbers(  # type: ignore[no-untyped-def]
    sim_app, mqtt_broker, mqtt_base_topic: str,
) -> None:
    base = mqtt_base_topic
    sim_app(device={"sim": {"temperature_c": 57.5, "cmm_used_mib": 1040}})
    c = Client(mqtt_broker.port)
    try:
        c.subscribe(f"{base}/telemetry", f"{base}/telemetry/+")
        c.wait(lambda: any(m["state"] == "idle" for m in c.json(f"{base}/telemetry")))
        body = next(m for m in c.json(f"{base}/telemetry") if m["state"] == "idle")
        assert body["temperature_c"] == 57.5 and body["cmm_free_mib"] == 6000.0 and body["state"] == "idle"
        assert body["devices"][0]["thermal"] == "normal" and body["devices"][0]["source"] == "sim"
        assert {"tokens_per_s", "requests", "errors", "uptime_s", "queue_depth"} <= body.keys()
        # The bare numbers follow the JSON message: wait for them rather than race them.
        c.wait(lambda: bool(c.messages[f"{base}/telemetry/temperature_c"]))
        assert c.messages[f"{base}/telemetry/temperature_c"][-1].payload == b"57.5"
    finally:
        c.close()
    late = Client(mqtt_broker.port)  # a dashboard that connects later sees the retained values
    try:
        late.subscribe(f"{base}/telemetry/cmm_free_mib")
        late.wait(lambda: bool(late.messages[f"{base}/telemetry/cmm_free_mib"]))
        assert late.messages[f"{base}/telemetry/cmm_free_mib"][0].payload == b"6000"
    finally:
        late.close()



def strict_json(payload: bytes) -> Any:
    """JSON as every other parser reads it: Infinity and NaN are not numbers there."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON message")
    return json.loads(payload, parse_constant=refuse)


def test_a_card_reading_infinity_is_null_not_a_500(  # type: ignore[no-untyped-def]
    sim_app, mqtt_broker, mqtt_base_topic: str,
) -> None:
    base = mqtt_base_topic
    app = sim_app(http={"enabled": True, "host": "127.0.0.1", "port": 0})
    assert app.http is not None
    c = Client(mqtt_broker.port)
    try:
        c.subscribe(f"{base}/telemetry", f"{base}/telemetry/+")
        app.monitor.set(0, temperature_c=float("inf"), npu_load_pct=float("nan"))
        deadline = time.monotonic() + 10
        while getattr(app.engine.devices()[0].reading, "temperature_c", 50.0) == 50.0:
            assert time.monotonic() < deadline, "the health job never read the card"
            time.sleep(0.05)
        health = httpx.get(f"http://127.0.0.1:{app.http.bound_port}/health", timeout=5)
        assert health.status_code == 200, health.text
        (device,) = strict_json(health.content)["devices"]
        assert device["temperature_c"] is None and device["npu_load_pct"] is None
        assert "temperature_c" in device["error"], "the reading says why the value is unknown"
        payload = app.telemetry.run()
        assert payload["temperature_c"] is None and payload["npu_load_pct"] is None
        c.wait(lambda: any(strict_json(m.payload)["temperature_c"] is None
                           for m in c.messages[f"{base}/telemetry"]))
        for name in ("temperature_c", "npu_load_pct"):
            values = [m.payload.decode() for m in c.messages[f"{base}/telemetry/{name}"]]
            assert all(math.isfinite(float(v)) for v in values), values
    finally:
        c.close()

def test_a_hang_set_over_mqtt_is_recovered_with_events_and_health(  # type: ignore[no-untyped-def]
    sim_app, mqtt_broker, mqtt_base_topic: str,
) -> None:
    base = mqtt_base_topic
    app = sim_app(http={"enabled": True, "host": "127.0.0.1", "port": 0})
    assert app.http is not None
    health_url = f"http://127.0.0.1:{app.http.bound_port}/health"
    c = Client(mqtt_broker.port)
    try:
        c.subscribe(f"{base}/event", f"{base}/state", f"{base}/response/#")
        c.publish(f"{base}/request/chat", {"id": "long", "prompt": "Tell a story.", "max_tokens": 40,
                                          "temperature": 0, "stream": True})
        c.publish(f"{base}/request/chat", {"id": "next", "prompt": "Say hi.", "max_tokens": 5,
                                          "temperature": 0})
        c.subscribe(f"{base}/stream/long")
        c.wait(lambda: bool(c.messages[f"{base}/stream/long"]))
        c.publish(f"{base}/request/sim", {"id": "s1", "fault": "hang"})
        c.wait(lambda: any(m.get("state") == "recovering" for m in c.json(f"{base}/state")))
        during = httpx.get(health_url, timeout=5)
        assert during.status_code == 503 and during.json()["state"] in ("recovering", "idle", "busy")
        c.wait(lambda: {m["id"] for m in c.json(f"{base}/response/chat")} >= {"long", "next"}, timeout=90)
        replies = {m["id"]: m for m in c.json(f"{base}/response/chat")}
        assert replies["long"]["status"] == "ok" and replies["next"]["status"] == "ok", replies
        stream = [json.loads(m.payload) for m in c.messages[f"{base}/stream/long"]]
        assert "".join(m["delta"] for m in stream) == replies["long"]["data"]["text"], "no repeated text"
        events = [m["event"] for m in c.json(f"{base}/event")]
        for name in ("device_hung", "recovery_started", "device_reset", "models_reloaded", "recovered"):
            assert name in events, (name, events)
        sim_reply = c.json(f"{base}/response/sim")[0]
        assert sim_reply["id"] == "s1" and sim_reply["status"] == "ok"
        deadline = time.monotonic() + 10
        while httpx.get(health_url, timeout=5).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        healthy = httpx.get(health_url, timeout=5).json()
        assert healthy["status"] == "ok"
        (device,) = healthy["devices"]
        assert device["source"] == "sim" and device["thermal"] == "normal" and device["recovering"] is False
        assert device["temperature_c"] == 50.0
    finally:
        c.close()


def fail_the_card(c: Client, base: str) -> None:
    """The simulated card dies for good; returns once the state says ``failed``."""
    c.publish(f"{base}/request/sim", {"fault": "dead"})
    c.wait(lambda: any(m.get("state") == "failed" for m in c.json(f"{base}/state")), timeout=30)


def test_a_dead_card_ends_failed_and_every_request_gets_a_clear_error(  # type: ignore[no-untyped-def]
    sim_app, mqtt_broker, mqtt_base_topic: str,
) -> None:
    base = mqtt_base_topic
    app = sim_app()
    c = Client(mqtt_broker.port)
    try:
        c.subscribe(f"{base}/event", f"{base}/state", f"{base}/response/chat")
        fail_the_card(c, base)
        c.publish(f"{base}/request/chat", {"id": "q", "prompt": "Hello?"})
        c.wait(lambda: bool(c.messages[f"{base}/response/chat"]))
        reply = c.json(f"{base}/response/chat")[0]
        assert reply["status"] == "error" and reply["error"]["code"] == "unavailable"
        assert "could not be recovered" in reply["error"]["message"]
        assert "device_failed" in [m["event"] for m in c.json(f"{base}/event")]
        assert app.engine.state().state == "failed" and app.link.connected.is_set()
    finally:
        c.close()


def test_reload_on_a_failed_card_is_answered_and_leaves_no_thread(  # type: ignore[no-untyped-def]
    sim_app, mqtt_broker, mqtt_base_topic: str,
) -> None:
    base = mqtt_base_topic
    app = sim_app()
    c = Client(mqtt_broker.port)
    try:
        c.subscribe(f"{base}/state", f"{base}/response/reload", f"{base}/response/restart")
        fail_the_card(c, base)
        threads = {t.ident for t in threading.enumerate()}
        for i in range(5):
            c.publish(f"{base}/request/reload", {"id": f"r{i}"})
        c.wait(lambda: len(c.json(f"{base}/response/reload")) == 5, timeout=10)
        for reply in c.json(f"{base}/response/reload"):
            assert reply["status"] == "error" and reply["error"]["code"] == "unavailable", reply
            assert "has failed" in reply["error"]["message"] and "restart" in reply["error"]["message"]
        deadline = time.monotonic() + 5
        while {t.ident for t in threading.enumerate()} - threads and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not {t.name for t in threading.enumerate() if t.ident not in threads}, "no thread left behind"
        c.publish(f"{base}/request/sim", {"fault": "none"})  # the card is back: the advice works
        c.publish(f"{base}/request/restart", {"id": "again"})
        c.wait(lambda: c.json(f"{base}/state")[-1]["state"] == "idle", timeout=60)
        assert app.engine.state().state == "idle"
    finally:
        c.close()

def test_thermal_transitions_are_events_and_pause_holds_jobs(  # type: ignore[no-untyped-def]
    sim_app, mqtt_broker, mqtt_base_topic: str,
) -> None:
    base = mqtt_base_topic
    app = sim_app()
    c = Client(mqtt_broker.port)
    try:
        c.subscribe(f"{base}/event", f"{base}/state", f"{base}/response/chat")
        c.publish(f"{base}/request/sim", {"temperature_c": 86})
        c.wait(lambda: "thermal_pause" in [m["event"] for m in c.json(f"{base}/event")])
        c.wait(lambda: any(m.get("state") == "paused" for m in c.json(f"{base}/state")))
        c.publish(f"{base}/request/chat", {"id": "cool", "prompt": "Hi", "max_tokens": 3, "temperature": 0})
        time.sleep(1.0)
        assert not c.messages[f"{base}/response/chat"], "a job waits while the card is too hot"
        assert app.engine.state().queue_depth == 1
        c.publish(f"{base}/request/sim", {"temperature_c": 60})
        c.wait(lambda: bool(c.messages[f"{base}/response/chat"]), timeout=30)
        assert c.json(f"{base}/response/chat")[0]["status"] == "ok"
        events = [m for m in c.json(f"{base}/event") if m["event"].startswith("thermal_")]
        assert [e["event"] for e in events] == ["thermal_pause", "thermal_normal"]
        assert events[0]["temperature_c"] == 86 and events[0]["device"] == 0
    finally:
        c.close()


def test_health_through_pyaxcl_speaks_bus_ids_and_never_declares_a_healthy_card_dead(  # type: ignore[no-untyped-def]
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Card index 0 is device id 1 to pyaxcl (a Pi 5 with one card): health reads it, no recovery."""
    base = mqtt_base_topic
    fake = install(monkeypatch, tmp_path, [1])
    path = write_config(tmp_path, mqtt_broker.port, base, demo_bundle_fp32,
                        device={"backend": "axcl", "smi_path": SMI, "health_interval": 0.2},
                        telemetry={"interval": 1})
    app = Appliance(load_config(path, env={}))
    c = Client(mqtt_broker.port)
    try:
        c.subscribe(f"{base}/event", f"{base}/telemetry")
        app.start()
        assert app.monitor.name == "axcl"
        assert app.engine.workers[0].loaded.wait(60)
        c.wait(lambda: any(m["state"] == "idle" for m in c.json(f"{base}/telemetry")), timeout=30)
        deadline = time.monotonic() + 1.5  # several health checks
        while len(fake.called("get_device_utilization_rate")) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        events = [m["event"] for m in c.json(f"{base}/event")]
        assert not {"device_dead", "recovery_started", "device_reset"} & set(events), events
        reading = app.engine.devices()[0].reading
        assert reading is not None, "the health job read the card"
        assert reading.alive and reading.source == "axcl" and reading.error is None, reading
        assert reading.npu_load_pct == 63 and reading.cpu_load_pct == 7, "load from pyaxcl"
        assert reading.temperature_c == 52 and reading.cmm_total_mib == 7040, "heat and CMM from axcl-smi"
        body = next(m for m in c.json(f"{base}/telemetry") if m["state"] == "idle")
        assert body["devices"][0]["source"] == "axcl" and body["devices"][0]["alive"] is True
        assert len(fake.called("get_device_utilization_rate")) >= 5
        assert set(fake.called("get_device_utilization_rate")) == {1}, "the bus id, never the index 0"
        assert set(fake.called("set_device")) == {1}
        assert fake.called("reset_device") == [] and app.engine.state().state == "idle"
    finally:
        c.close()
        app.stop()
    assert not fake.initialised, "the monitor finalises pyaxcl on stop"
