"""The appliance end to end: a real Mosquitto, the real demo model, real MQTT clients."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mqtt_client import Client, write_config
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.app import Appliance
from appliance.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"max_tokens": 8, "temperature": 0}


@pytest.fixture
def start_app(tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path) -> Iterator:  # type: ignore[no-untyped-def, type-arg]
    apps: list[Appliance] = []

    def start(**over: Any) -> Appliance:
        config = load_config(
            write_config(tmp_path, mqtt_broker.port, mqtt_base_topic, demo_bundle_fp32, **over), env={}
        )
        app = Appliance(config)
        app.start()
        for worker in app.engine.workers:
            assert worker.loaded.wait(60)
        assert app.link.subscribed.wait(10)
        apps.append(app)
        return app

    yield start
    for app in apps:
        app.stop()


@pytest.fixture
def client(mqtt_broker) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    c = Client(mqtt_broker.port)
    yield c
    c.close()


def test_mqtt5_response_topic_with_correlation_data(start_app, client: Client, mqtt_base_topic: str) -> None:  # type: ignore[no-untyped-def]
    start_app()
    client.subscribe("replies/client")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "replies/client"
    props.CorrelationData = b"\x00corr-1"
    client.publish(
        f"{mqtt_base_topic}/request/chat", {"id": "q1", "prompt": "Name a colour.", **SHORT}, props
    )
    client.wait(lambda: bool(client.messages["replies/client"]))
    (msg,) = client.messages["replies/client"]
    assert msg.properties.CorrelationData == b"\x00corr-1"
    body = json.loads(msg.payload)
    assert body["id"] == "q1" and body["status"] == "ok" and body["data"]["text"].strip()
    assert body["data"]["usage"]["completion_tokens"] <= 8


def test_311_reply_to_plain_text_and_the_mcu_copy(start_app, mqtt_broker, mqtt_base_topic: str) -> None:  # type: ignore[no-untyped-def]
    start_app()
    old = Client(mqtt_broker.port, v5=False)
    base = mqtt_base_topic
    old.subscribe("replies/arduino-7", "replies/arduino-7/text", f"{base}/response/chat",
                  f"{base}/response/chat/text")
    old.publish(
        f"{base}/request/chat",
        {
            "id": 7,
            "prompt": "Say hello.",
            "reply_to": "replies/arduino-7",
            "max_bytes": 10,
            "max_tokens": 30,
            "temperature": 0,
        },
    )
    old.wait(lambda: bool(old.messages["replies/arduino-7"]) and bool(old.messages["replies/arduino-7/text"]))
    body = old.json("replies/arduino-7")[0]
    assert body["id"] == 7 and body["status"] == "ok"
    short = old.messages["replies/arduino-7/text"][0].payload
    assert len(short) <= 10 and body["data"]["text"].encode().startswith(short)
    old.publish(f"{base}/request/chat", "What is the capital of France?")
    old.wait(lambda: bool(old.messages[f"{base}/response/chat"]))
    # The private answer was never copied to the shared topics; the public one is.
    assert old.messages[f"{base}/response/chat"][0].payload != old.messages["replies/arduino-7"][0].payload
    old.wait(lambda: bool(old.messages[f"{base}/response/chat/text"]))
    assert len(old.messages[f"{base}/response/chat/text"]) == 1
    plain = old.json(f"{base}/response/chat")[0]
    # Default sampling is random, so only the shape is fixed: the plain text became a user turn
    # of the chat template (far more prompt tokens than the seven words alone).
    assert plain["status"] == "ok" and plain["id"] and plain["data"]["text"].strip()
    assert plain["data"]["usage"]["prompt_tokens"] > 20
    old.close()


def test_stream_is_ordered_and_complete(start_app, client: Client, mqtt_base_topic: str) -> None:  # type: ignore[no-untyped-def]
    start_app()
    base = mqtt_base_topic
    client.subscribe(f"{base}/stream/s1", f"{base}/response/chat")
    client.publish(
        f"{base}/request/chat",
        {
            "id": "s1",
            "prompt": "Write a line about rain.",
            "stream": True,
            "max_tokens": 30,
            "temperature": 0,
        },
    )
    client.wait(lambda: bool(client.messages[f"{base}/response/chat"]))
    stream = client.json(f"{base}/stream/s1")
    final = client.json(f"{base}/response/chat")[0]
    assert [m["seq"] for m in stream] == list(range(len(stream)))
    assert stream[-1]["done"] is True and all(not m["done"] for m in stream[:-1])
    assert "".join(m["delta"] for m in stream) == final["data"]["text"]


def test_full_queue_is_busy_and_cancel_frees_it(start_app, client: Client, mqtt_base_topic: str) -> None:  # type: ignore[no-untyped-def]
    start_app(engine={"queue_max": 1, "max_active": 1})
    base = mqtt_base_topic
    client.subscribe(f"{base}/response/#", f"{base}/stream/b0")
    long = {"prompt": "Tell a very long story.", "max_tokens": 400, "temperature": 0.8, "seed": 1}
    client.publish(f"{base}/request/chat", {"id": "b0", **long, "stream": True})
    client.wait(lambda: bool(client.messages[f"{base}/stream/b0"]))  # b0 runs: the queue is empty
    for i in (1, 2):
        client.publish(f"{base}/request/chat", {"id": f"b{i}", **long})
    client.wait(lambda: any(r["id"] == "b2" for r in client.json(f"{base}/response/chat")))
    busy = next(r for r in client.json(f"{base}/response/chat") if r["id"] == "b2")
    assert busy["status"] == "error" and busy["error"]["code"] == "busy" and busy["error"]["retry_after"] >= 1
    for rid in ("b0", "b1"):
        client.publish(f"{base}/request/cancel", {"id": rid})
    client.wait(lambda: {r["id"] for r in client.json(f"{base}/response/chat")} >= {"b0", "b1", "b2"}, 30)
    codes = {
        r["id"]: r["error"]["code"] for r in client.json(f"{base}/response/chat") if r["status"] == "error"
    }
    assert codes["b0"] == "cancelled" and codes["b1"] == "cancelled"


def test_prompt_sent_while_down_is_answered_after_restart(
    start_app, client: Client, mqtt_base_topic: str
) -> None:  # type: ignore[no-untyped-def]
    base = mqtt_base_topic
    app = start_app()
    client.subscribe(f"{base}/response/chat", f"{base}/status")
    app.stop()
    client.wait(lambda: any(m.payload == b"stopped" for m in client.messages[f"{base}/status"]))
    client.publish(f"{base}/request/chat", {"id": "while-down", "prompt": "Hello?", **SHORT})
    time.sleep(0.5)
    assert client.json(f"{base}/response/chat") == []
    start_app()
    client.wait(lambda: bool(client.json(f"{base}/response/chat")))
    (reply,) = client.json(f"{base}/response/chat")
    assert reply["id"] == "while-down" and reply["status"] == "ok"


def test_broker_restart_mid_run(start_app, client: Client, mqtt_broker, mqtt_base_topic: str) -> None:  # type: ignore[no-untyped-def]
    app = start_app()
    base = mqtt_base_topic
    mqtt_broker.restart(down_for=1.0)
    assert app.link.connected.wait(15)
    time.sleep(0.5)
    fresh = Client(mqtt_broker.port)
    fresh.subscribe(f"{base}/status", f"{base}/info", f"{base}/response/chat")
    fresh.wait(lambda: bool(fresh.messages[f"{base}/info"]) and bool(fresh.messages[f"{base}/status"]), 15)
    assert fresh.messages[f"{base}/status"][-1].payload == b"online"
    fresh.publish(f"{base}/request/chat", {"id": "after", "prompt": "Hi", **SHORT})
    fresh.wait(lambda: bool(fresh.json(f"{base}/response/chat")), 30)
    assert fresh.json(f"{base}/response/chat")[0]["status"] == "ok"
    fresh.close()


def test_two_appliances_on_a_shared_group_answer_each_request_once(  # type: ignore[no-untyped-def]
    start_app, client: Client, mqtt_base_topic: str
) -> None:
    base = mqtt_base_topic
    apps = [
        start_app(mqtt={"shared_group": "pool", "client_id": f"{base}-{i}"}, engine={"queue_max": 40})
        for i in range(2)
    ]
    client.subscribe(f"{base}/response/chat")
    ids = [f"r{i}" for i in range(40)]
    for rid in ids:
        client.publish(f"{base}/request/chat", {"id": rid, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    client.wait(lambda: len(client.json(f"{base}/response/chat")) >= 40, 180)
    time.sleep(1.0)
    replies = client.json(f"{base}/response/chat")
    assert sorted(r["id"] for r in replies) == sorted(ids), "each request answered exactly once"
    assert all(r["status"] == "ok" for r in replies)
    assert all(app.engine.jobs_done > 0 for app in apps), "both appliances took a share"


def test_last_will_after_kill_9(
    tmp_path: Path,
    mqtt_broker,
    client: Client,
    mqtt_base_topic: str,  # type: ignore[no-untyped-def]
    demo_bundle_fp32: Path,
) -> None:
    base = mqtt_base_topic
    config = write_config(tmp_path, mqtt_broker.port, base, demo_bundle_fp32)
    client.subscribe(f"{base}/status")
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "-c", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client.wait(lambda: any(m.payload == b"online" for m in client.messages[f"{base}/status"]), 60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        client.wait(lambda: client.messages[f"{base}/status"][-1].payload == b"offline", 30)
    finally:
        if proc.poll() is None:
            proc.kill()



def test_the_log_says_when_it_is_ready_and_how_to_talk_to_it(
    tmp_path: Path, mqtt_broker, client: Client, mqtt_base_topic: str,  # type: ignore[no-untyped-def]
    demo_bundle_fp32: Path,
) -> None:
    base = mqtt_base_topic
    config = write_config(tmp_path, mqtt_broker.port, base, demo_bundle_fp32,
                          http={"enabled": True, "host": "0.0.0.0", "port": 0})
    log = tmp_path / "appliance.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "-c", str(config)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not (ready := [line for line in log.read_text().splitlines() if " ready: " in line]):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        (line,) = ready
        assert f"MQTT broker 127.0.0.1:{mqtt_broker.port}" in line and "demo (onnx)" in line, line
        match = re.search(r"send prompts to (\S+), answers on (\S+) .*API at (http://\S+/v1)", line)
        assert match, line
        request, response, url = match.groups()
        assert (request, response) == (f"{base}/request/chat", f"{base}/response/chat")
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/v1"), "a URL a client can use"
        assert httpx.get(f"{url}/models", timeout=5).json()["data"][0]["id"] == "demo"
        client.subscribe(response)
        client.publish(request, {"id": "hello", "prompt": "Hi", **SHORT})
        client.wait(lambda: bool(client.json(response)), 30)
        assert client.json(response)[0]["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

MALFORMED: list[bytes | str] = [
    b"",
    b"{",
    b"\xff\xfe\x00garbage",
    '{"id": "m1"}',
    '{"id": "m2", "prompt": ""}',
    '{"id": "m3", "prompt": 42}',
    '{"id": "m4", "messages": "not a list"}',
    '{"id": "m5", "messages": [{"role": "wizard", "content": "hi"}]}',
    '{"id": "m6", "prompt": "hi", "max_tokens": -5}',
    '{"id": "m7", "prompt": "hi", "temperature": 9}',
    '{"id": "m8", "prompt": "hi", "model": "no-such-model"}',
    '{"id": "m9", "prompt": "hi", "reply_to": "t/+/x"}',
    '{"id": "m10", "prompt": "' + "word " * 3000 + '"}',
    '{"id": ["x"], "prompt": "hi"}',
    '{"id": "a/b", "prompt": "hi"}',
]


def test_malformed_requests_each_get_one_error_reply_and_the_process_lives(  # type: ignore[no-untyped-def]
    start_app, client: Client, mqtt_base_topic: str
) -> None:
    import random

    base = mqtt_base_topic
    app = start_app()
    client.subscribe(f"{base}/response/#")
    rng = random.Random(3)
    payloads = [
        *MALFORMED,
        # \xff never starts UTF-8: random bytes that are not text (text would be a prompt to answer)
        *(b"\xff" + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) for _ in range(30)),
    ]
    for payload in payloads:
        client.publish(f"{base}/request/chat", payload)
    client.publish(f"{base}/request/no_such_op", {"id": "op"})
    expected = len(payloads) + 1
    client.wait(
        lambda: sum(len(v) for k, v in client.messages.items() if not k.endswith("/text")) >= expected
    )
    time.sleep(0.5)
    replies = [r for k in list(client.messages) if not k.endswith("/text") for r in client.json(k)]
    assert len(replies) == expected, "exactly one reply per request"
    assert all(r["status"] == "error" and r["error"]["code"] and r["error"]["message"] for r in replies)
    by_id = {
        r["id"]: r["error"]["code"] for r in replies if isinstance(r["id"], str) and r["status"] == "error"
    }
    assert {f"m{i}" for i in range(1, 11)} <= set(by_id), "every malformed JSON request is refused"
    assert by_id["m8"] == "model_not_found" and by_id["m10"] == "context_length_exceeded"
    assert by_id["op"] == "unknown_op"
    client.publish(f"{base}/request/chat", {"id": "alive", "prompt": "Hi", **SHORT})
    client.wait(lambda: any(r.get("id") == "alive" for r in client.json(f"{base}/response/chat")))
    assert app.engine.state().state in ("idle", "busy")
