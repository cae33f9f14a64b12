"""A fake engine both front doors can drive, and a recording MQTT publish, for the input tests.

The engine answers at once on the caller's thread (a chat job with a short text, an image job
with a 1x1 PNG), refuses unknown models like the real one, and keeps every request it accepted,
so a test can check what reached the engine and what never did.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.mqtt_link import encode_payload
from npu.diffusion.params import ImageOutput, ImageTimings
from npu.engine.api import (
    ChatRequest,
    ChatResult,
    Done,
    EngineError,
    EngineState,
    ErrorCode,
    ImageRequest,
    ImageResult,
    JobHandle,
    ModelInfo,
    Persona,
    Sink,
)
from npu.llm.params import Usage

CHAT_MODEL, IMAGE_MODEL, CONTEXT = "m", "sd", 2048
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8ff"
    "ff3f0005fe02fea7d6a4d90000000049454e44ae426082"
)


class FakeEngine:
    """The slice of ``npu.engine.engine.Engine`` the handlers and the bridge call."""

    default_chat = CHAT_MODEL
    default_image = IMAGE_MODEL

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # False: keep nothing (a long run that measures memory)
        self.submitted: list[ChatRequest | ImageRequest] = []
        self.lock = threading.Lock()
        self.paused: str | None = None

    def submit(self, request: ChatRequest | ImageRequest, sink: Sink) -> JobHandle:
        image = isinstance(request, ImageRequest)
        wanted = request.model or (IMAGE_MODEL if image else CHAT_MODEL)
        if wanted != (IMAGE_MODEL if image else CHAT_MODEL):
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"no model {wanted!r} here")
        if self.keep:
            with self.lock:
                self.submitted.append(request)
        handle = JobHandle(request, sink)
        if isinstance(request, ImageRequest):
            output = ImageOutput(1, 1, request.params.seed or 0, request.params.steps, 3, False,
                                 ImageTimings(), PNG_1X1, "image/png", "png", None)
            handle.finish(Done(ImageResult(output, IMAGE_MODEL, 1.0, 0.0)))
        else:
            handle.finish(Done(ChatResult("ok", CHAT_MODEL, "stop", Usage(3, 1, 0), 1.0, 1.0, 2.0, 0.0)))
        return handle

    def cancel(self, request_id: str) -> int:
        return 0

    def state(self) -> EngineState:
        return EngineState("paused" if self.paused else "idle", 0, 0, 4, self.paused)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(CHAT_MODEL, "chat", True, "onnx", CONTEXT, CONTEXT - 128),
                ModelInfo(IMAGE_MODEL, "image", True, "onnx", None, None, ["64x64"], [1, 2, 4])]

    def pause(self, reason: str = "paused") -> None:
        self.paused = reason

    def resume(self) -> None:
        self.paused = None

    def reload(self, model_id: str | None = None) -> None:
        if model_id not in (None, CHAT_MODEL, IMAGE_MODEL):
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"no model {model_id!r} here")

    def restart(self, reason: str = "restart") -> list[int]:
        return [0]

    def personas(self) -> list[Persona]:
        return []

    def persona(self, name: str | None) -> Persona | None:
        return None


@dataclass(frozen=True)
class Msg:
    """An inbound MQTT message as the dispatcher sees it."""

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry: int | None = None
    received_at: float = field(default_factory=time.monotonic)
    qos: int = 1


class Published:
    """Stands in for ``MqttLink.publish``: keeps what would be sent, JSON as the wire has it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: Any, qos: int = 1, retain: bool = False,
                 properties: Any = None, **_: Any) -> bool:
        wire = encode_payload(payload)  # must always encode, as the link would
        try:
            value = json.loads(wire)
        except ValueError:
            value = payload  # plain text (the copy for microcontrollers) or image bytes
        with self.lock:
            self.items.append((topic, value))
        return True

    def replies(self) -> list[dict[str, Any]]:
        """Every final reply ``{id, status, data, error}`` published so far."""
        with self.lock:
            return [p for t, p in self.items
                    if isinstance(p, dict) and "status" in p and "/stream/" not in t]

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
