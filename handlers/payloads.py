"""Request payloads on ``{base}/request/<kind>``, validated with pydantic.

Forgiving where it is safe, strict where a guess would be wrong: a payload that is not JSON is
plain text (the prompt for chat, the id for cancel); a JSON array is refused (it is data, not a
prompt); an unknown field is an error that names it and the closest known one (``"max_token": 5``
would otherwise run without a limit); a known field of the wrong type or out of its range is an
error that names the field (``"0.5"`` for ``temperature`` is refused rather than silently
converted). JSON is read by ``npu.json_input``: a value it cannot use (a number of thousands of
digits, ``NaN``, text that is not UTF-8) is refused by field, with the request's id echoed.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from npu.diffusion.params import SEED_BOUND as IMAGE_SEED
from npu.json_input import JsonInputError, decode_utf8, first_invalid, loads
from npu.llm.params import PARAM_BOUNDS
from npu.sentences import MAX_WIDTH, MIN_WIDTH
from npu.validation import bounded, describe_errors

logger = logging.getLogger(__name__)

RequestId = StrictStr | StrictInt
MQTT_MAX_PACKET = 268_435_455  # the largest payload MQTT can carry
MAX_TIMEOUT_S = 86_400.0
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


def _bound(name: str) -> Any:
    """The validator holding a generation control to its ``PARAM_BOUNDS`` range."""
    return bounded(PARAM_BOUNDS[name])


class PayloadError(Exception):
    """A payload that cannot be used; ``request_id`` is the caller's id when one could be read."""

    def __init__(self, code: str, message: str, request_id: str | int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class _Payload(BaseModel):
    model_config = _STRICT

    id: RequestId | None = Field(default=None, description="caller's id, echoed as given in every reply")
    reply_to: StrictStr | None = Field(default=None, description="reply topic for MQTT 3.1.1 clients")


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: StrictStr
    content: StrictStr


class ChatPayload(_Payload):
    """``{base}/request/chat``: messages or prompt, OpenAI-named sampling controls."""

    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    prompt: StrictStr | None = None
    model: StrictStr | None = None
    persona: StrictStr | None = Field(default=None, description="a persona's name: its model, system prompt "
                                      "and defaults")
    max_tokens: Annotated[StrictInt | None, _bound("max_tokens")] = None
    temperature: Annotated[float | None, _bound("temperature")] = None
    top_p: Annotated[float | None, _bound("top_p")] = None
    top_k: Annotated[StrictInt | None, _bound("top_k")] = None
    min_p: Annotated[float | None, _bound("min_p")] = None
    repetition_penalty: Annotated[float | None, _bound("repetition_penalty")] = None
    presence_penalty: Annotated[float | None, _bound("presence_penalty")] = None
    frequency_penalty: Annotated[float | None, _bound("frequency_penalty")] = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: Annotated[StrictInt | None, _bound("seed")] = None  # -1: random
    stream: bool = False
    chunk: Literal["sentence", "line"] | None = Field(
        default=None, description="stream whole sentences (speakers) or lines of `width` (signs)")
    width: StrictInt | None = Field(default=None, ge=MIN_WIDTH, le=MAX_WIDTH,
                                    description="characters per line (chunk line) or per sentence at most")
    # Structured answers (handlers/structured.py): at most one of the three.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema",
                                               description="a JSON Schema the answer must validate against")
    format: Literal["json"] | None = Field(default=None, description='"json": the answer is one JSON object')
    choices: list[StrictStr] | None = Field(default=None, description="the answer is exactly one of these")
    max_bytes: StrictInt | None = Field(default=None, ge=1, le=MQTT_MAX_PACKET,
                                        description="cap of the plain-text copy")
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S,
                                    description="deadline relative to receipt")
    speak: StrictStr | None = Field(default=None, description="a speaker: the answer is spoken there, "
                                    "sentence by sentence as it is written (handlers/spoken.py)")
    voice: StrictStr | None = Field(default=None, description="the voice that speaks it (with speak)")

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> ChatPayload:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either messages or prompt (exactly one)")
        if self.width is not None and self.chunk is None:
            raise ValueError('width needs chunk ("sentence" or "line")')
        return self


class ImagePayload(_Payload):
    """``{base}/request/image``: a prompt in, an image out on a display topic."""

    prompt: StrictStr
    negative_prompt: StrictStr = ""
    model: StrictStr | None = None
    persona: StrictStr | None = Field(default=None, description="a persona's name: its image style")
    width: StrictInt | None = Field(default=None, ge=8, le=4096)
    height: StrictInt | None = Field(default=None, ge=8, le=4096)
    steps: StrictInt = Field(default=4, ge=1, le=8)
    seed: Annotated[StrictInt | None, bounded(IMAGE_SEED)] = None  # -1: random
    guidance_scale: float = Field(default=1.0, ge=1.0, le=4.0)
    display: StrictStr | None = None
    preview: bool | None = Field(default=None, description="JPEG previews on display/<name>/preview "
                                 "after each step (default: images.preview for the display)")
    format: Literal["png", "jpeg"] | None = None
    quality: StrictInt | None = Field(default=None, ge=40, le=100)
    stream: bool = False
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S,
                                    description="deadline relative to receipt")


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
    temperature_c: float | None = Field(default=None, ge=-50, le=200)
    cmm_used_mib: float | None = Field(default=None, ge=0, le=2**20)
    npu_load_pct: float | None = Field(default=None, ge=0, le=100)
    fault: Literal["none", "hang", "reset", "dead"] | None = None


class ResumePayload(_Payload):
    """``{base}/request/resume``."""


class ScenePayload(_Payload):
    """``{base}/request/scene``: the scene to switch to (plain text: its name)."""

    scene: StrictStr = Field(min_length=1, max_length=64)


class ReloadPayload(_Payload):
    model: StrictStr | None = None


def decode_payload(raw: bytes) -> dict[str, Any] | str:
    """A JSON object as a dict, anything else as text.

    A payload whose first non-blank character is ``{`` must be valid JSON: treating broken JSON
    as a prompt would answer a question nobody asked; so must one that starts with ``[`` and
    parses (an array is refused). Values the JSON reader could not use stay in the dict as
    ``Invalid`` for ``validate_payload`` to refuse by name, once the id has been read.
    """
    text, bad_byte = decode_utf8(raw)
    stripped = text.strip().lstrip("\ufeff")
    if stripped.startswith(("{", "[")):
        try:
            obj = loads(stripped)
        except JsonInputError as exc:
            if bad_byte is not None:
                raise PayloadError("bad_request", f"payload is not valid UTF-8 (byte {bad_byte})") from exc
            if not exc.syntax:
                raise PayloadError("bad_request", f"payload cannot be read: {exc}") from exc
            if stripped.startswith("{"):
                raise PayloadError("bad_request", f"payload is not valid JSON: {exc}") from exc
            obj = None  # "[INST] ..." and the like: plain text
        if isinstance(obj, dict):
            return obj
        if isinstance(obj, list):
            raise PayloadError("bad_request", "payload is a JSON array; send a JSON object or plain text")
    if bad_byte is not None:
        raise PayloadError("bad_request", f"payload is not valid UTF-8 (byte {bad_byte})")
    return text


def usable_id(obj: dict[str, Any] | str) -> str | int | None:
    """The caller's id when it is a string or an integer (not a bool), else None."""
    if not isinstance(obj, dict):
        return None
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    return value


def describe_validation(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line naming each bad field: ``temperature: Input should be a valid number``."""
    lines = [line for _, line in describe_errors(exc.errors(include_url=False), model)]
    parts = lines[:5]
    if len(lines) > len(parts):
        parts.append(f"and {len(lines) - len(parts)} more")
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
    found = first_invalid(obj)
    if found is not None:
        path, invalid = found
        raise PayloadError("bad_request", f"{path}: {invalid.problem}", usable_id(obj))
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise PayloadError("bad_request", describe_validation(exc, model), usable_id(obj)) from exc
