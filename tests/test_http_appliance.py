"""The bridge inside the appliance: next to MQTT, on the same engine and queue."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import load_config


def test_mqtt_and_http_requests_share_the_engine(
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,  # type: ignore[no-untyped-def]
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = mqtt_base_topic
    path = write_config(tmp_path, mqtt_broker.port, base, demo_bundle_fp32,
                        http={"enabled": True, "host": "0.0.0.0", "port": 0})
    caplog.set_level(logging.WARNING)
    app = Appliance(load_config(path, env={}))
    app.start()
    mqtt = Client(mqtt_broker.port)
    try:
        assert app.http is not None
        assert "without an API key" in caplog.text, "an open bridge on every interface is warned about"
        for worker in app.engine.workers:
            assert worker.loaded.wait(60)
        assert app.link.subscribed.wait(10)
        url = f"http://127.0.0.1:{app.http.bound_port}"
        mqtt.subscribe(f"{base}/stream/m1", f"{base}/response/chat", f"{base}/info")
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/info"]))
        urls = {info["http"] for info in mqtt.json(f"{base}/info")}
        assert urls == {f"http://0.0.0.0:{app.http.bound_port}/v1"}, "each retained info names the port"

        http_times: list[float] = []
        http_text: list[str] = []

        def http_stream() -> None:
            body = {"messages": [{"role": "user", "content": "A line about rain."}], "max_tokens": 20,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        http_times.append(time.monotonic())
                        http_text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")

        t = threading.Thread(target=http_stream)
        t.start()
        mqtt.publish(f"{base}/request/chat", {"id": "m1", "prompt": "A line about snow.", "stream": True,
                                             "max_tokens": 20, "temperature": 0})
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/response/chat"]))
        t.join(60)
        mqtt_times = [m.timestamp for m in mqtt.messages[f"{base}/stream/m1"]]
        reply = mqtt.json(f"{base}/response/chat")[0]
        assert reply["status"] == "ok" and reply["id"] == "m1"
        assert "".join(http_text).strip()
        # Both answers were generated side by side: their streams overlap in time.
        assert min(http_times) < max(mqtt_times) and min(mqtt_times) < max(http_times)
        assert app.engine.jobs_done >= 2
        health = httpx.get(f"{url}/health").json()
        assert health["status"] == "ok" and health["jobs_done"] == app.engine.jobs_done
    finally:
        mqtt.close()
        app.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_a_taken_http_port_leaves_mqtt_serving_and_says_why(
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,  # type: ignore[no-untyped-def]
) -> None:
    base = mqtt_base_topic
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        path = write_config(tmp_path, mqtt_broker.port, base, demo_bundle_fp32,
                            http={"enabled": True, "host": "127.0.0.1", "port": port})
        mqtt = Client(mqtt_broker.port)
        mqtt.subscribe(f"{base}/event", f"{base}/info", f"{base}/response/chat")
        app = Appliance(load_config(path, env={}))
        app.start()
        try:
            assert app.http is None
            mqtt.wait(lambda: any(e["event"] == "http_failed" for e in mqtt.json(f"{base}/event")))
            failed = next(e for e in mqtt.json(f"{base}/event") if e["event"] == "http_failed")
            assert str(port) in failed["error"]
            mqtt.wait(lambda: bool(mqtt.messages[f"{base}/info"]))
            assert mqtt.json(f"{base}/info")[-1]["http"] is None
            assert app.link.subscribed.wait(10)
            mqtt.publish(f"{base}/request/chat", {"id": "q1", "prompt": "Say hi.", "max_tokens": 4,
                                                  "temperature": 0})
            mqtt.wait(lambda: bool(mqtt.messages[f"{base}/response/chat"]))
            assert mqtt.json(f"{base}/response/chat")[0]["status"] == "ok"
        finally:
            mqtt.close()
            app.stop()


def test_state_health_and_telemetry_agree_while_a_job_runs(
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,  # type: ignore[no-untyped-def]
) -> None:
    """A dashboard shows busy for as long as an answer is being written, and idle only after it."""
    base = mqtt_base_topic
    path = write_config(tmp_path, mqtt_broker.port, base, demo_bundle_fp32,
                        http={"enabled": True, "host": "127.0.0.1", "port": 0}, engine={"max_active": 1})
    app = Appliance(load_config(path, env={}))
    app.start()
    mqtt = Client(mqtt_broker.port)
    try:
        assert app.http is not None and app.engine.workers[0].loaded.wait(60)
        assert app.link.subscribed.wait(10)
        url = f"http://127.0.0.1:{app.http.bound_port}/health"
        queue, running = f"{base}/telemetry/queue_depth", f"{base}/telemetry/running"
        mqtt.subscribe(f"{base}/state", f"{base}/stream/long", f"{base}/response/chat", queue, running)
        mqtt.wait(lambda: any(s["state"] == "idle" for s in mqtt.json(f"{base}/state")))
        mqtt.publish(f"{base}/request/chat", {"id": "long", "prompt": "Tell a very long story.",
                                             "stream": True, "max_tokens": 120, "temperature": 0.8,
                                             "seed": 1})
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/stream/long"]))
        mqtt.wait(lambda: mqtt.json(f"{base}/state")[-1]["running"] == 1, timeout=5)
        retained = mqtt.json(f"{base}/state")[-1]
        health = httpx.get(url, timeout=5).json()
        telemetry = app.telemetry.run()
        mqtt.wait(lambda: bool(mqtt.messages[running]) and mqtt.messages[running][-1].payload == b"1",
                  timeout=5)
        assert not mqtt.messages[f"{base}/response/chat"], "the job must still run while this is checked"
        assert (retained["state"], retained["running"], retained["queue_depth"]) == ("busy", 1, 0)
        assert (health["state"], health["running"], health["queue_depth"]) == ("busy", 1, 0)
        assert (telemetry["state"], telemetry["running"], telemetry["queue_depth"]) == ("busy", 1, 0)
        assert mqtt.messages[queue][-1].payload == b"0", "what Home Assistant's queue sensor reads"

        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/response/chat"]))
        mqtt.wait(lambda: mqtt.json(f"{base}/state")[-1]["state"] == "idle", timeout=5)
        replied_at = mqtt.messages[f"{base}/response/chat"][0].timestamp
        states = [(m.timestamp, json.loads(m.payload)) for m in mqtt.messages[f"{base}/state"]]
        first_busy = next(t for t, s in states if s["running"] == 1)
        during = [s for t, s in states if first_busy <= t < replied_at]
        assert all((s["state"], s["running"]) == ("busy", 1) for s in during), during
        final_at, final = states[-1]
        assert (final["state"], final["running"], final["queue_depth"]) == ("idle", 0, 0)
        assert final_at >= replied_at, "idle comes only once the answer was sent"
        assert httpx.get(url, timeout=5).json()["running"] == 0
        # The bare figures follow the state message: wait for them rather than race them.
        mqtt.wait(lambda: mqtt.messages[running][-1].payload == b"0", timeout=5)
    finally:
        mqtt.close()
        app.stop()
