"""What handlers are given: one context object instead of many positional arguments.

Handlers see the engine, a paho-free ``publish`` function, the topic tree and the limits. They
never import paho; properties travel as a plain mapping (``correlation_data``, ``content_type``,
``message_expiry``) that the MQTT link turns into MQTT 5 properties.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from handlers.acceptance import JournalLike
from npu.diffusion.image_encode import ImageFormat
from npu.engine.api import EngineClient

if TYPE_CHECKING:
    from handlers.moderation import Gate

logger = logging.getLogger(__name__)

PUBSUBCLIENT_PACKET = 256  # Arduino PubSubClient's default buffer: the whole packet, topic included
# Fixed header (1) + remaining length (2, since 127 < 256 - 3) + topic length (2) + packet id (2,
# QoS 1) + 1 byte of margin for PubSubClient's own bookkeeping.
PUBLISH_OVERHEAD = 8
MIN_TEXT_BYTES = 16
DEFAULT_MAX_PAYLOAD = 65536  # bytes; mqtt.max_payload


class PublishFn(Protocol):
    def __call__(
        self,
        topic: str,
        payload: Any,
        qos: int = 1,
        retain: bool = False,
        properties: Mapping[str, Any] | None = None,
        *,
        on_delivered: Callable[[], None] | None = None,
    ) -> Any: ...


class TopicsLike(Protocol):
    base: str

    def response(self, kind: str) -> str: ...
    def response_text(self, kind: str) -> str: ...
    def stream(self, request_id: str) -> str: ...
    def display(self, name: str) -> str: ...
    def display_meta(self, name: str) -> str: ...
    def display_preview(self, name: str) -> str: ...
    def progress(self, request_id: str) -> str: ...
    def audio(self, speaker: str) -> str: ...
    def audio_chunk(self, speaker: str) -> str: ...
    def sender_response(self, sender: str, kind: str) -> str: ...
    def parse_request(self, topic: str) -> tuple[str, str | None] | None: ...
    def check_reply_topic(self, topic: str, sender: str | None = None) -> str | None: ...


def default_text_bytes(topic: str, packet: int = PUBSUBCLIENT_PACKET) -> int:
    """Largest plain-text payload that, on ``topic``, fits one PubSubClient packet.

    ``packet - 8 - len(topic)``: for ``appliance/response/chat/text`` (28 bytes) that is 220.
    """
    return max(MIN_TEXT_BYTES, packet - PUBLISH_OVERHEAD - len(topic.encode("utf-8")))


@dataclass(frozen=True)
class Limits:
    """Front-door limits.

    Args:
        max_payload: inbound payloads above this many bytes are refused unparsed.
        request_timeout: default relative deadline (s) for chat jobs without one; None = engine's.
        reply_retain: never retain replies (kept as a knob for tests).
    """

    max_payload: int = DEFAULT_MAX_PAYLOAD
    request_timeout: float | None = None
    reply_retain: bool = False


@dataclass(frozen=True)
class ImageDefaults:
    """What an image request gets for the fields it leaves out (``images:`` in the config)."""

    display: str = "main"
    format: ImageFormat = "png"
    quality: int = 90
    max_bytes: int = 3_500_000
    preview: bool = False  # JPEG previews on display/<name>/preview while a picture is made
    preview_size: int = 256  # pixels on the preview's longer side
    displays: Mapping[str, bool] = field(default_factory=dict)  # display -> previews on/off

    def preview_for(self, display: str, asked: bool | None) -> int | None:
        """The preview size for a picture on ``display`` (None: no previews): the request's
        ``preview`` when given, else the display's rule, else ``preview``."""
        wanted = asked if asked is not None else self.displays.get(display, self.preview)
        return self.preview_size if wanted else None


class SceneSwitch(Protocol):
    """What the ``scene`` request may do with the scenes: list them, switch to one."""

    def names(self) -> list[str]: ...
    def switch(self, name: str, reason: str = ...) -> dict[str, Any]: ...


@dataclass(frozen=True)
class HandlerContext:
    engine: EngineClient
    publish: PublishFn
    topics: TopicsLike
    limits: Limits = Limits()
    images: ImageDefaults = ImageDefaults()
    sim: Any = None  # the simulated card (``npu.device.sim.SimMonitor``) when device.backend is sim
    journal: JournalLike | None = None  # durable acceptance of chat and image requests
    moderation: Gate | None = None  # the gate for public prompts (``moderation:``); None: off
    scenes: SceneSwitch | None = None  # the installation's scenes (``appliance.scenes``); None: none


class HandlerError(Exception):
    """A typed failure a handler raises; the wrapper turns it into an error reply."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class RequestMeta:
    """Transport facts about one request that handlers may need (no paho objects)."""

    kind: str
    received_at: float  # time.monotonic() at receipt
    message_expiry: int | None = None  # MQTT 5 Message Expiry Interval left, seconds
    sender: str | None = None  # the named sender of {base}/request/<op>/<sender>; None: public


def engine_request_id(request_id: str | int, sender: str | None) -> str:
    """The id a job carries in the engine: a named sender's ids live in their own namespace.

    Public ids cannot contain ``/`` (they name stream topics), so ``<sender>/<id>`` can never be
    reached by a public ``cancel``, and one sender cannot cancel another's job.
    """
    return str(request_id) if sender is None else f"{sender}/{request_id}"


PUBLIC_SENDER = "mqtt"  # the queue's name for every public request: they share one turn


def queue_sender(sender: str | None) -> str:
    """Who a request counts as in the queue's turns and limits: a named sender (the MQTT user the
    broker's ACL pins to its topics) by its name; every public request as ``mqtt``, since MQTT
    does not tell a subscriber who published."""
    return sender if sender is not None else PUBLIC_SENDER


class _Pending:
    """Returned by a handler that will complete its ``Reply`` later (from another thread)."""

    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()

# handle_<op>(request, ctx, reply, meta) -> data dict | PENDING; raises HandlerError
Handler = Callable[..., Any]
