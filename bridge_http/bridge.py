"""What every route needs: the engine, the bridge's settings, and model lookups."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Literal

from starlette.requests import Request

from bridge_http.body_guard import DEFAULT_MAX_BODY
from bridge_http.errors import OpenAIError
from bridge_http.image_store import ImageStore
from npu.engine.api import EngineClient, Persona, persona_missing


@dataclass(frozen=True)
class BridgeSettings:
    api_key: str | None = None
    max_body: int = DEFAULT_MAX_BODY  # bytes of a request body; more is a 413 before any parsing
    cors_origins: tuple[str, ...] = ()  # browser origins answered on CORS preflight (none: off)
    max_n: int = 4
    ping_interval: float = 10.0  # seconds of silence before a ': ping' comment in a stream
    progress_ping_interval: float = 1.0  # at most one ping this often while a prompt is prefilled
    image_url_ttl: float = 3600.0  # seconds an image URL (response_format url) stays valid
    raw_prompt_special_tokens: bool = False  # /v1/completions prompts may hold special tokens
    sender: Literal["address", "api_key"] = "address"  # who a request counts as in the queue's turns


@dataclass
class Bridge:
    engine: EngineClient
    settings: BridgeSettings = field(default_factory=BridgeSettings)
    created: int = field(default_factory=lambda: int(time.time()))
    images: ImageStore = field(init=False)

    def __post_init__(self) -> None:
        self.images = ImageStore(ttl=self.settings.image_url_ttl)

    def model_id(self, requested: str | None) -> str:
        """The model a request will run on; an unknown name is kept for the engine to refuse."""
        return requested or self.engine.default_chat or ""

    def persona_of(self, model: str | None, persona: str | None) -> Persona | None:
        """The persona a body asks for: its ``persona`` extra, or ``model`` naming one; a body with
        neither a model nor a persona gets the scene's default persona, if any."""
        if persona is not None:
            found = self.engine.persona(persona)
            if found is None:
                missing = persona_missing(persona, [p.name for p in self.engine.personas()])
                raise OpenAIError(404, missing.message, param="persona", code=missing.code.value)
            return found
        return self.engine.persona(model) if model else self.engine.persona(None)

    def sender_of(self, request: Request) -> str:
        """The queue's name for this client: ``http:<address>``, or ``http:key-<digest>`` of its
        bearer token (never the token itself, which would show on /metrics)."""
        if self.settings.sender == "api_key":
            token = request.headers.get("authorization", "").partition(" ")[2].strip()
            if token:
                return "http:key-" + hashlib.sha256(token.encode()).hexdigest()[:12]
        return f"http:{request.client.host if request.client else 'unknown'}"

    def context_length(self, model_id: str) -> int | None:
        for info in self.engine.models():
            if info.id == model_id or model_id in (info.aliases or ()):
                return info.context_length
        return None
