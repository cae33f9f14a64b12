"""Op name -> handler, built once, and the dispatcher that runs every request through one wrapper.

The wrapper is where the "exactly one final reply" promise is kept: it routes the reply, parses
and validates the payload, calls the handler, and turns every outcome (data, ``HandlerError``,
``EngineError``, any other exception) into one ``{id, status, data, error}`` message. Handlers that
answer later (chat, reload) return ``PENDING`` and complete the same ``Reply`` object, which sends
at most once.

The dispatcher is one thread fed by the queue the MQTT link fills; handlers only submit to the
engine (fast) or start a short-lived thread, so one slow request never stalls the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from handlers.acceptance import Accepted, Replayed, Seen, request_digest
from handlers.chat import handle_chat
from handlers.context import PENDING, Handler, HandlerContext, HandlerError, RequestMeta
from handlers.control import (
    handle_cancel,
    handle_health_check,
    handle_pause,
    handle_reload,
    handle_restart,
    handle_resume,
    handle_sim,
)
from handlers.image import handle_image
from handlers.inbound import InboundMessage
from handlers.payloads import (
    CancelPayload,
    ChatPayload,
    HealthPayload,
    ImagePayload,
    PausePayload,
    PayloadError,
    ReloadPayload,
    RestartPayload,
    ResumePayload,
    ScenePayload,
    SimPayload,
    decode_payload,
    usable_id,
    validate_payload,
)
from handlers.reply import Reply, Route, publish_all, route_reply
from handlers.scene import handle_scene
from handlers.speech import SpeakPayload, handle_speak
from npu.engine.api import EngineError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HandlerSpec:
    """One request kind.

    Args:
        payload: the pydantic model the payload is validated against.
        handler: ``handle_<op>(request, ctx, reply, meta)``.
        text_field: the field a plain-text payload fills (None: plain text means "no fields").
        assign_id: give requests without an id a generated one (echoed in the reply).
        durable: journal the request before it runs (it survives a crash and is deduplicated).
        text_copy: its reply has a plain-text copy for microcontrollers.
    """

    op: str
    payload: type[BaseModel]
    handler: Handler
    text_field: str | None = None
    assign_id: bool = False
    durable: bool = False
    text_copy: bool = False


def build_registry() -> dict[str, HandlerSpec]:
    """The request kinds this appliance answers on ``{base}/request/<op>``."""
    specs = [
        HandlerSpec("chat", ChatPayload, handle_chat, text_field="prompt", assign_id=True,
                    durable=True, text_copy=True),
        HandlerSpec("image", ImagePayload, handle_image, text_field="prompt", assign_id=True,
                    durable=True),
        # Not journaled: an utterance is for whoever stands at the speaker now, not after a restart.
        HandlerSpec("speak", SpeakPayload, handle_speak, text_field="text", assign_id=True),
        HandlerSpec("cancel", CancelPayload, handle_cancel, text_field="id"),
        HandlerSpec("health_check", HealthPayload, handle_health_check),
        HandlerSpec("pause", PausePayload, handle_pause, text_field="reason"),
        HandlerSpec("resume", ResumePayload, handle_resume),
        HandlerSpec("reload", ReloadPayload, handle_reload, text_field="model"),
        HandlerSpec("restart", RestartPayload, handle_restart, text_field="reason"),
        HandlerSpec("sim", SimPayload, handle_sim, text_field="fault"),
        HandlerSpec("scene", ScenePayload, handle_scene, text_field="scene"),
    ]
    return {spec.op: spec for spec in specs}


def dispatch(msg: InboundMessage, ctx: HandlerContext, registry: Mapping[str, HandlerSpec]) -> Reply | None:
    """Run one inbound message through the wrapper; returns its ``Reply`` (None: not a request).

    Never raises: every failure becomes the request's error reply. Durable kinds (chat, image)
    are journaled before their handler runs, so the caller may acknowledge the message to the
    broker once this returns; a request the journal has seen already is not run again.
    """
    parsed = ctx.topics.parse_request(msg.topic)
    if parsed is None:
        logger.warning("ignoring a message on %r: not a request topic", msg.topic)
        return None
    kind, sender = parsed
    spec = registry.get(kind)
    text_copy = spec is not None and spec.text_copy
    replayed: Replayed | None = getattr(msg, "replayed", None)

    def new_reply(route: Route, request_id: str | int | None) -> Reply:
        reply = Reply(ctx.publish, route, request_id, text_copy=text_copy)
        if replayed is not None and ctx.journal is not None:
            reply.bind(ctx.journal, replayed.seq)  # whatever ends it, the journal row is closed
        return reply

    payload = bytes(msg.payload)
    limit = ctx.limits.max_payload
    if len(payload) > limit:
        route = route_reply(ctx.topics, kind, msg.response_topic, msg.correlation_data, sender=sender)
        reply = new_reply(route, None)
        reply.error("payload_too_large", f"payload is {len(payload)} bytes; the limit is {limit}")
        return reply
    try:
        obj = decode_payload(payload)
    except PayloadError as exc:
        route = route_reply(ctx.topics, kind, msg.response_topic, msg.correlation_data, sender=sender)
        reply = new_reply(route, None)
        reply.error(exc.code, _with_refusal(exc.message, route.refused))
        return reply
    reply_to = obj.get("reply_to") if isinstance(obj, dict) else None
    route = route_reply(ctx.topics, kind, msg.response_topic, msg.correlation_data, reply_to,
                        sender=sender)
    given_id = usable_id(obj)
    reply = new_reply(route, given_id)
    if route.refused is not None:
        reply.error("bad_request", route.refused)
        return reply
    if spec is None:
        known = ", ".join(sorted(registry))
        reply.error("unknown_op", f"no request kind {kind!r} here; known: {known}")
        return reply
    meta = RequestMeta(kind=kind, received_at=msg.received_at, message_expiry=msg.message_expiry,
                       sender=sender)
    try:
        request = validate_payload(spec.payload, obj, spec.text_field)
        if reply.request_id is None and spec.assign_id:
            reply.request_id = replayed.request_id if replayed else f"{kind}-{uuid.uuid4().hex[:12]}"
        durable = spec.durable and ctx.journal is not None and replayed is None
        if durable and not _admit(msg, ctx, reply, kind, sender, given_id, payload):
            return reply
        result = spec.handler(request, ctx, reply, meta)
        if result is not PENDING and not reply.sent:
            reply.ok(_as_data(result))
    except PayloadError as exc:
        reply.error(exc.code, exc.message)
    except HandlerError as exc:
        reply.error(exc.code, exc.message, **exc.extra)
    except EngineError as exc:
        reply.error(exc.code.value, exc.message, retry_after=exc.retry_after)
    except Exception:
        logger.exception("handler %r failed on id %r", kind, reply.request_id)
        reply.error("internal", f"the {kind} handler failed; see the appliance log")
    return reply


def _admit(msg: InboundMessage, ctx: HandlerContext, reply: Reply, kind: str, sender: str | None,
           given_id: str | int | None, payload: bytes) -> bool:
    """Journal a new request and bind its reply; False when it is one the journal has seen.

    A request seen before costs no generation: one still running is answered once, when it ends;
    one answered already gets its stored reply again when the caller resent it, and nothing when
    the broker redelivered it (its reply went out the first time).
    """
    assert ctx.journal is not None and reply.request_id is not None
    redelivered = bool(getattr(msg, "dup", False))
    accepted = Accepted(
        sender=sender, given_id=None if given_id is None else str(given_id),
        request_id=str(reply.request_id), kind=kind, digest=request_digest(kind, payload),
        topic=msg.topic, payload=payload, response_topic=msg.response_topic,
        correlation_data=msg.correlation_data, message_expiry=msg.message_expiry, qos=msg.qos,
        received=time.time() - max(0.0, time.monotonic() - msg.received_at),
        mid=int(getattr(msg, "mid", 0) or 0),
    )
    admission = ctx.journal.admit(accepted, redelivered=redelivered)
    if admission.seen is Seen.NEW:
        assert admission.seq is not None
        reply.bind(ctx.journal, admission.seq)
        return True
    logger.info("request %r from %s seen before (%s%s): not run again", reply.request_id,
                sender or "the public", admission.seen.value, ", redelivered" if redelivered else "")
    if admission.seen is Seen.ANSWERED and not redelivered:
        publish_all(ctx.publish, admission.reply)
    return False


def _as_data(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    if isinstance(result, dict):
        return result
    return {"result": result}


def _with_refusal(message: str, refused: str | None) -> str:
    return message if refused is None else f"{message}; also {refused}"


_STOP = object()


class Dispatcher:
    """One thread that takes inbound messages off ``inbound`` and dispatches them in order.

    Args:
        inbound: the queue the MQTT link fills.
        ctx: collaborators for the handlers.
        registry: op -> handler; ``build_registry()`` when omitted.
    """

    def __init__(
        self,
        inbound: queue.Queue[Any],
        ctx: HandlerContext,
        registry: Mapping[str, HandlerSpec] | None = None,
        side_topics: Mapping[str, Callable[[bytes], None]] | None = None,
        streams: Callable[[InboundMessage], bool] | None = None,
    ) -> None:
        self.inbound = inbound
        self.side_topics = dict(side_topics or {})  # topic -> callback, for topics that are not requests
        self.streams = streams  # takes a message outside the request tree (a microphone), True if it did
        self.ctx = ctx
        self.registry = dict(registry) if registry is not None else build_registry()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # start (after the models load) may race a stop
        self._stopped = False
        self._first: list[Any] = []

    def handle(self, msg: InboundMessage) -> Reply | None:
        """Dispatch one message on the caller's thread (the loop uses this; so do tests).

        The message is acknowledged to the broker afterwards: by then it is answered, journaled,
        or under way (a control request).
        """
        try:
            return self._handle(msg)
        finally:
            ack = getattr(msg, "ack", None)
            if ack is not None:
                try:
                    ack()
                except Exception:
                    logger.exception("could not acknowledge a message on %r", getattr(msg, "topic", "?"))

    def _handle(self, msg: InboundMessage) -> Reply | None:
        if self.streams is not None:
            try:
                if self.streams(msg):
                    return None
            except Exception:
                logger.exception("handling %r failed", msg.topic)
                return None
        side = self.side_topics.get(getattr(msg, "topic", ""))
        if side is not None:
            try:
                side(bytes(msg.payload))
            except Exception:
                logger.exception("handling %r failed", msg.topic)
            return None
        try:
            return dispatch(msg, self.ctx, self.registry)
        except Exception:  # dispatch never raises; belt and braces for the loop
            logger.exception("dispatch failed on %r", getattr(msg, "topic", "?"))
            return None

    def start(self, first: list[Any] | None = None) -> None:
        """Start the thread; ``first`` (requests replayed from the journal) go before the queue.

        A dispatcher that was stopped stays stopped.
        """
        with self._lock:
            if self._thread is not None or self._stopped:
                return
            self._first = list(first or [])
            thread = threading.Thread(target=self._run, name="mqtt-dispatcher", daemon=True)
            thread.start()
            self._thread = thread

    def stop(self, timeout: float = 5.0) -> None:
        """Let the messages already queued be dispatched, then end the thread."""
        with self._lock:
            self._stopped = True
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self.inbound.put(_STOP)
        thread.join(timeout)

    def _run(self) -> None:
        first, self._first = self._first, []
        for msg in first:
            self.handle(msg)
        while True:
            msg = self.inbound.get()
            if msg is _STOP:
                return
            self.handle(msg)
