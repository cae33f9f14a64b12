"""Images over MQTT against a real Mosquitto: display topics, descriptions, replies, errors."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_client import Client, write_config
from PIL import Image

from appliance.app import Appliance
from appliance.config import load_config


@pytest.fixture
def image_app(tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,  # type: ignore[no-untyped-def]
              sd_bundle: Path) -> Iterator[Appliance]:
    models = [{"id": "demo", "kind": "chat", "path": str(demo_bundle_fp32), "runtime": "onnx"},
              {"id": "sd", "kind": "image", "path": str(sd_bundle), "runtime": "onnx"}]
    path = write_config(tmp_path, mqtt_broker.port, mqtt_base_topic, demo_bundle_fp32, models=models,
                        images={"display": "lobby", "format": "png"})
    app = Appliance(load_config(path, env={}))
    app.start()
    for worker in app.engine.workers:
        assert worker.loaded.wait(60)
    assert app.link.subscribed.wait(10)
    yield app
    app.stop()


def test_an_image_reaches_its_display_with_its_description(image_app: Appliance, mqtt_broker,  # type: ignore[no-untyped-def]
                                                           mqtt_base_topic: str) -> None:
    base = mqtt_base_topic
    client = Client(mqtt_broker.port)
    try:
        client.subscribe(f"{base}/response/image", f"{base}/display/#", f"{base}/stream/#")
        client.publish(f"{base}/request/image", {"id": "i1", "prompt": "a cat wearing sunglasses", "seed": 9,
                                                 "stream": True})
        client.wait(lambda: bool(client.messages[f"{base}/response/image"]))
        (reply,) = client.json(f"{base}/response/image")
        assert reply["status"] == "ok" and reply["id"] == "i1", reply
        data = reply["data"]
        assert data["topic"] == f"{base}/display/lobby" and data["seed"] == 9 and data["steps"] == 4
        (image,) = client.messages[f"{base}/display/lobby"]
        assert hashlib.sha256(image.payload).hexdigest() == data["sha256"]
        assert len(image.payload) == data["bytes"]
        assert Image.open(io.BytesIO(image.payload)).size == (64, 64)
        assert image.properties.ContentType == "image/png"
        (meta,) = client.json(f"{base}/display/lobby/meta")
        assert {k: meta[k] for k in ("id", "prompt", "seed", "sha256")} == {
            "id": "i1", "prompt": "a cat wearing sunglasses", "seed": 9, "sha256": data["sha256"]}
        progress = client.json(f"{base}/stream/i1")
        assert [p.get("step") for p in progress if p.get("stage") == "unet"] == [1, 2, 3, 4]
        assert progress[-1]["done"] is True
        assert "sha256" in reply["data"] and "data" not in reply["data"], "the reply never carries the bytes"
    finally:
        client.close()
    late = Client(mqtt_broker.port)  # a display that connects later sees the latest picture
    try:
        late.subscribe(f"{base}/display/lobby", f"{base}/display/lobby/meta")
        topics = (f"{base}/display/lobby", f"{base}/display/lobby/meta")
        late.wait(lambda: all(late.messages[t] for t in topics))
        assert late.messages[f"{base}/display/lobby"][0].retain
        assert hashlib.sha256(late.messages[f"{base}/display/lobby"][0].payload).hexdigest() == data["sha256"]
    finally:
        late.close()


def test_plain_text_and_bad_image_requests(image_app: Appliance, mqtt_broker, mqtt_base_topic: str) -> None:  # type: ignore[no-untyped-def]
    base = mqtt_base_topic
    client = Client(mqtt_broker.port)
    try:
        client.subscribe(f"{base}/response/image", f"{base}/display/#")
        client.publish(f"{base}/request/image", "rain over the gallery")
        client.publish(f"{base}/request/image", {"id": "big", "prompt": "x", "width": 512, "height": 512})
        client.publish(f"{base}/request/image", {"id": "steps", "prompt": "x", "steps": 3})
        client.publish(f"{base}/request/image", {"id": "disp", "prompt": "x", "display": "a/b"})
        client.publish(f"{base}/request/image", {"id": "jpg", "prompt": "neon city streets", "format": "jpeg",
                                                 "quality": 80, "display": "wall"})
        client.wait(lambda: len(client.messages[f"{base}/response/image"]) >= 5)
        replies = {r["id"]: r for r in client.json(f"{base}/response/image")}
        (text_id,) = [i for i in replies if str(i).startswith("image-")]
        assert replies[text_id]["data"]["prompt"] == "rain over the gallery"
        assert replies["big"]["error"]["code"] == "bad_request"
        assert "supported: 64x64" in replies["big"]["error"]["message"]
        assert "supported: 1, 2, 4" in replies["steps"]["error"]["message"]
        assert replies["disp"]["error"]["code"] == "bad_request"
        jpg = replies["jpg"]["data"]
        assert jpg["content_type"] == "image/jpeg" and jpg["quality"] == 80
        assert client.messages[f"{base}/display/wall"][0].payload[:3] == b"\xff\xd8\xff"
    finally:
        client.close()


def test_the_demo_without_an_image_model_says_how_to_get_one(  # type: ignore[no-untyped-def]
    tmp_path: Path, mqtt_broker, mqtt_base_topic: str, demo_bundle_fp32: Path,
) -> None:
    base = mqtt_base_topic
    app = Appliance(load_config(write_config(tmp_path, mqtt_broker.port, base, demo_bundle_fp32), env={}))
    app.start()
    client = Client(mqtt_broker.port)
    try:
        assert app.link.subscribed.wait(10)
        client.subscribe(f"{base}/response/image")
        client.publish(f"{base}/request/image", {"id": "x", "prompt": "a cat"})
        client.wait(lambda: bool(client.messages[f"{base}/response/image"]))
        (reply,) = client.json(f"{base}/response/image")
        assert reply["error"]["code"] == "model_not_found"
        assert "scripts/fetch_models sd15-lcm" in reply["error"]["message"]
    finally:
        client.close()
        app.stop()
