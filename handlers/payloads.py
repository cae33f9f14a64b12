"""Request payloads on ``{base}/request/<kind>``, validated with pydantic.

Forgiving where it is safe, strict where a guess would be wrong: a payload that is not a JSON
object is plain text (the prompt for chat, the id for cancel); unknown fields are ignored (clients
grow fields); a known field of the wrong type is an error that names the field (``"0.5"`` for
``temperature`` is refused rather than silently converted).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

logger = logging.getLogger(__name__)

RequestId = StrictStr | StrictInt


class PayloadError(Exception):
    """A payload that cannot be used; ``request_id`` is the caller's id when one could be read."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class _Payload(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    id: RequestId | None = Field(default=None, description="caller's id, echoed as given in every reply")
    reply_to: StrictStr | None = Field(default=None, description="reply topic for MQTT 3.1.1 clients")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    role: StrictStr
    content: StrictStr


class ChatPayload(_Payload):
    """``{base}/request/chat``: messages or prompt, OpenAI-named sampling controls."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: StrictStr | None = None
    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: bool = False
    max_bytes: StrictInt | None = Field(default=None, ge=1, description="cap of the plain-text copy")
    timeout_s: float | None = Field(default=None, gt=0, description="deadline relative to receipt")

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> ChatPayload:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either messages or prompt (exactly one)")
        return self


class ImagePayload(_Payload):
    """``{base}/request/image``: a prompt in, an image out on a display topic."""

    prompt: StrictStr
    negative_prompt: StrictStr = ""
    model: StrictStr | None = None
    width: StrictInt | None = Field(default=None, ge=8, le=4096)
    height: StrictInt | None = Field(default=None, ge=8, le=4096)
    steps: StrictInt = Field(default=4, ge=1, le=8)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**32 - 1)
    guidance_scale: float = Field(default=1.0, ge=1.0, le=4.0)
    display: StrictStr | None = None
    format: Literal["png", "jpeg"] | None = None
    quality: StrictInt | None = Field(default=None, ge=40, le=100)
    stream: bool = False
    timeout_s: float | None = Field(default=None, gt=0, description="deadline relative to receipt")


class CancelPayload(_Payload):
    """``{base}/request/cancel``: cancel every job submitted with ``id``."""


class HealthPayload(_Payload):
    """``{base}/request/health_check``."""


class PausePayload(_Payload):
    """``paused: false`` resumes (what a Home Assistant switch sends when turned off)."""

    reason: StrictStr | None = None
    paused: bool = True


class RestartPayload(_Payload):
    """``{base}/request/restart``: reset the devices and reload the models, as a recovery does."""

    reason: StrictStr | None = None


class SimPayload(_Payload):
    """``{base}/request/sim``: steer the simulated card (``device.backend: sim`` only)."""

    device: StrictInt | None = Field(default=None, ge=0)
    temperature_c: float | None = None
    cmm_used_mib: float | None = Field(default=None, ge=0)
    npu_load_pct: float | None = Field(default=None, ge=0, le=100)
    fault: Literal["none", "hang", "reset", "dead"] | None = None


class ResumePayload(_Payload):
    """``{base}/request/resume``."""


class ReloadPayload(_Payload):
    model: StrictStr | None = None


def decode_payload(raw: bytes) -> dict[str, Any] | str:
    """A JSON object as a dict, anything else as text.

    A payload whose first non-blank character is ``{`` must be valid JSON: treating broken JSON
    as a prompt would answer a question nobody asked.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError("bad_request", f"payload is not valid UTF-8 (byte {exc.start})") from exc
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PayloadError("bad_request", f"payload is not valid JSON: {exc}") from exc
        if not isinstance(obj, dict):  # pragma: no cover - '{' always parses to a dict
            raise PayloadError("bad_request", "payload must be a JSON object")
        return obj
    return text


def usable_id(obj: dict[str, Any] | str) -> str | int | None:
    """The caller's id when it is a string or an integer (not a bool), else None."""
    if not isinstance(obj, dict):
        return None
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value


def describe_validation(exc: ValidationError) -> str:
    """One line naming each bad field: ``temperature: Input should be a valid number``."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = exc.error_count() - len(parts)
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def validate_payload(
    model: type[BaseModel], obj: dict[str, Any] | str, text_field: str | None
) -> BaseModel:
    """Validate a decoded payload against ``model``; plain text fills ``text_field``."""
    if isinstance(obj, str):
        if text_field is None or not obj.strip():
            obj = {}
        else:
            obj = {text_field: obj.strip() if text_field == "id" else obj}
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise PayloadError("bad_request", describe_validation(exc), usable_id(obj)) from exc
