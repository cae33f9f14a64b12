"""Image jobs in the engine: one device step per UNet step, chat streaming in between, typed errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from npu.diffusion.params import ImageParams
from npu.engine.api import (
    ChatRequest,
    Delta,
    Done,
    EngineError,
    ErrorCode,
    Failed,
    ImageProgress,
    ImageRequest,
    ImageResult,
    JobEvent,
)
from npu.engine.engine import Engine, EngineConfig
from npu.engine.worker import ModelSpec
from npu.llm.params import GenerationParams


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, JobEvent]] = []

    def sink(self, tag: str):  # type: ignore[no-untyped-def]
        def receive(event: JobEvent) -> None:
            with self.lock:
                self.items.append((tag, event))
        return receive


@pytest.fixture
def engine(demo_bundle_fp32: Path, sd_bundle: Path) -> Iterator[Engine]:
    specs = [ModelSpec("chat", "chat", demo_bundle_fp32, runtime="onnx"),
             ModelSpec("sd", "image", sd_bundle, runtime="onnx")]
    engine = Engine(specs, config=EngineConfig(max_active=2))
    engine.start(timeout=120)
    yield engine
    engine.stop()


def test_an_image_job_reports_each_step_and_ends_with_the_image(engine: Engine) -> None:
    events = Events()
    cat = ImageParams(prompt="a cat wearing sunglasses", seed=5)
    handle = engine.submit(ImageRequest(cat), events.sink("i"))
    assert handle.wait(60)
    progress = [e for _, e in events.items if isinstance(e, ImageProgress)]
    assert [(p.stage, p.step) for p in progress] == [("text", 0), ("unet", 1), ("unet", 2), ("unet", 3),
                                                     ("unet", 4)]
    (_, done) = events.items[-1]
    assert isinstance(done, Done) and isinstance(done.result, ImageResult)
    assert done.result.output.seed == 5 and done.result.output.data.startswith(b"\x89PNG")
    again = Events()
    engine.submit(ImageRequest(cat), again.sink("i")).wait(60)
    assert again.items[-1][1].result.output.data == done.result.output.data  # type: ignore[union-attr]
    (info,) = [m for m in engine.models() if m.id == "sd"]
    assert info.kind == "image" and info.loaded and info.sizes == ["64x64"] and info.steps == [1, 2, 4]


def test_chat_streams_between_the_steps_of_an_image(engine: Engine) -> None:
    events = Events()
    story = [{"role": "user", "content": "Tell a story about a lighthouse."}]
    chat = engine.submit(ChatRequest(messages=story, params=GenerationParams(max_tokens=24, temperature=0)),
                         events.sink("chat"))
    image = engine.submit(ImageRequest(ImageParams(prompt="neon city streets", seed=1)), events.sink("image"))
    assert chat.wait(60) and image.wait(60)
    order = [tag for tag, e in events.items if isinstance(e, Delta | ImageProgress)]
    first_image, last_image = order.index("image"), len(order) - 1 - order[::-1].index("image")
    assert "chat" in order[first_image:last_image], "chat tokens arrive while the image is being made"
    assert all(isinstance(e, Done) for _, e in events.items if isinstance(e, Done | Failed))


def test_image_requests_the_model_cannot_serve_are_refused_at_once(engine: Engine) -> None:
    with pytest.raises(EngineError) as size:
        engine.submit(ImageRequest(ImageParams(prompt="x", width=512, height=512)), lambda e: None)
    assert size.value.code is ErrorCode.BAD_REQUEST and "supported: 64x64" in size.value.message
    with pytest.raises(EngineError) as steps:
        engine.submit(ImageRequest(ImageParams(prompt="x", steps=3)), lambda e: None)
    assert "supported: 1, 2, 4" in steps.value.message
    with pytest.raises(EngineError) as model:
        engine.submit(ImageRequest(ImageParams(prompt="x"), model="chat"), lambda e: None)
    assert model.value.code is ErrorCode.MODEL_NOT_FOUND and "available: sd" in model.value.message
    events = Events()
    engine.submit(ImageRequest(ImageParams(prompt="x", seed=1, max_bytes=100)), events.sink("i")).wait(60)
    (_, failed) = events.items[-1]
    assert isinstance(failed, Failed) and failed.error.code is ErrorCode.BAD_REQUEST
    assert "100-byte limit" in failed.error.message
    assert engine.state().state == "idle"


def test_without_an_image_model_the_error_says_how_to_install_one(demo_bundle_fp32: Path) -> None:
    engine = Engine([ModelSpec("chat", "chat", demo_bundle_fp32, runtime="onnx")])
    with pytest.raises(EngineError) as info:
        engine.submit(ImageRequest(ImageParams(prompt="a cat")), lambda e: None)
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND
    assert "no image model is installed" in info.value.message
    assert "scripts/fetch_models sd15-lcm" in info.value.message
