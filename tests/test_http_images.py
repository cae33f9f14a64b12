"""Images over HTTP: the ``openai`` client's images API and AUTOMATIC1111's txt2img, on the tiny bundle."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from bridge_http.app import create_app
from bridge_http.bridge import BridgeSettings
from bridge_http.server import HttpServer
from npu.engine.engine import Engine, EngineConfig
from npu.engine.worker import ModelSpec

KEY = "gallery-key"


@pytest.fixture(scope="module")
def root(demo_bundle_fp32: Path, sd_bundle: Path) -> Iterator[str]:
    specs = [ModelSpec("chat", "chat", demo_bundle_fp32, runtime="onnx"),
             ModelSpec("sd", "image", sd_bundle, runtime="onnx")]
    engine = Engine(specs, config=EngineConfig(max_active=2))
    engine.start(timeout=120)
    settings = BridgeSettings(api_key=KEY, max_n=3, image_url_ttl=60)
    server = HttpServer(create_app(engine, settings), "127.0.0.1", 0)
    server.start()
    yield f"http://127.0.0.1:{server.bound_port}"
    server.stop()
    engine.stop()


@pytest.fixture
def client(root: str) -> Iterator[OpenAI]:
    c = OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0, timeout=60)
    yield c
    c.close()


def png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_openai_images_generate_returns_seeded_pictures(client: OpenAI) -> None:
    cat = "a cat wearing sunglasses"
    result = client.images.generate(prompt=cat, n=2, size="64x64", extra_body={"seed": 5})
    assert len(result.data) == 2
    images = [base64.b64decode(d.b64_json or "") for d in result.data]
    assert all(png(i).size == (64, 64) for i in images) and images[0] != images[1]
    again = client.images.generate(prompt=cat, extra_body={"seed": 6})
    assert base64.b64decode(again.data[0].b64_json or "") == images[1], "n pictures use seed, seed+1, ..."
    jpeg = client.images.generate(prompt="neon city streets", extra_body={"output_format": "jpeg", "seed": 1})
    assert base64.b64decode(jpeg.data[0].b64_json or "")[:3] == b"\xff\xd8\xff"


def test_url_images_are_served_without_the_key_until_they_expire(client: OpenAI, root: str) -> None:
    result = client.images.generate(prompt="rain", response_format="url", extra_body={"seed": 2})
    url = result.data[0].url or ""
    assert url.startswith(f"{root}/v1/images/files/") and url.endswith(".png")
    fetched = httpx.get(url, timeout=10)  # no Authorization: a display just fetches it
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert png(fetched.content).size == (64, 64)
    missing = httpx.get(f"{root}/v1/images/files/nothing-here.png", timeout=10)
    assert missing.status_code == 404 and "expired" in missing.json()["error"]["message"]


def test_what_the_model_cannot_make_is_a_400_listing_what_it_can(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="x", size="1024x1024")
    assert "supported: 64x64" in size.value.message
    with pytest.raises(openai.BadRequestError) as steps:
        client.images.generate(prompt="x", extra_body={"steps": 3})
    assert "supported: 1, 2, 4" in steps.value.message
    with pytest.raises(openai.BadRequestError) as many:
        client.images.generate(prompt="x", n=5)
    assert "n must be at most 3" in many.value.message
    with pytest.raises(openai.BadRequestError) as shape:
        client.images.generate(prompt="x", size="big")  # type: ignore[arg-type]
    assert "WxH" in shape.value.message
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="chat")
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_automatic1111_txt2img(root: str) -> None:
    auth = ("anyone", KEY)  # A1111 clients send Basic credentials
    body = {"prompt": "a lighthouse in a storm at night", "seed": 11, "batch_size": 2, "steps": 4,
            "cfg_scale": 7, "sampler_name": "Euler a", "width": 64, "height": 64}
    r = httpx.post(f"{root}/sdapi/v1/txt2img", json=body, auth=auth, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [11, 12] and info["width"] == 64 and info["steps"] == 4
    assert len(answer["images"]) == 2
    assert all(png(base64.b64decode(i)).size == (64, 64) for i in answer["images"])
    assert answer["parameters"]["prompt"] == body["prompt"]
    randomized = httpx.post(f"{root}/sdapi/v1/txt2img", json={"prompt": "x"}, auth=auth, timeout=60)
    assert json.loads(randomized.json()["info"])["seed"] >= 0
    bad = httpx.post(f"{root}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 20}, auth=auth, timeout=60)
    assert bad.status_code == 400
    assert set(bad.json()) == {"error", "detail", "body", "errors"}, "A1111's error shape"
    assert "supported: 1, 2, 4" in bad.json()["detail"]
    unauthorized = httpx.post(f"{root}/sdapi/v1/txt2img", json={"prompt": "x"}, timeout=10)
    assert unauthorized.status_code == 401 and "detail" in unauthorized.json()
    models = httpx.get(f"{root}/sdapi/v1/sd-models", auth=auth, timeout=10).json()
    assert [m["model_name"] for m in models] == ["sd"]
