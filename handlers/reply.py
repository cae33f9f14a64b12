"""Reply routing and the one-final-reply guarantee.

Routing (DESIGN.md): the MQTT 5 Response Topic (with its Correlation Data) wins; else ``reply_to``
from the payload; else ``{base}/response/<kind>``. A caller-chosen topic that is refused (wildcard,
``$``-topic, the appliance's own tree, ``homeassistant/``) is not used: the request is answered
with an error on the default topic that says why, and is not executed.

``Reply`` sends ``{id, status, data, error}`` at most once, from whichever thread finishes the
request; a second attempt is logged and dropped, so a handler bug can never double-answer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from handlers.context import PublishFn, TopicsLike
from npu.engine.api import JobEvent

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where a reply goes; ``refused`` says why the caller's own choice was not used."""

    topic: str
    correlation_data: bytes | None = None
    refused: str | None = None


def route_reply(
    topics: TopicsLike,
    kind: str,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    reply_to: Any = None,
) -> Route:
    """Pick the reply topic for one request (see the module docstring)."""
    default = topics.response(kind)
    if response_topic is not None:
        reason = topics.check_reply_topic(response_topic)
        if reason is None:
            return Route(response_topic, correlation_data)
        return Route(default, correlation_data, f"response topic refused: {reason}")
    if reply_to is not None:
        if not isinstance(reply_to, str):
            return Route(default, None, "reply_to must be a string topic")
        reason = topics.check_reply_topic(reply_to)
        if reason is None:
            return Route(reply_to)
        return Route(default, None, f"reply_to refused: {reason}")
    return Route(default)


def cut_utf8(text: str, max_bytes: int) -> bytes:
    """``text`` as UTF-8, cut to at most ``max_bytes`` without splitting a character."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return data
    return data[: max(0, max_bytes)].decode("utf-8", "ignore").encode("utf-8")


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return body


class Reply:
    """The single final answer of one request.

    Args:
        publish: the link's publish function.
        route: where the answer goes.
        request_id: the caller's id as given (None when none was usable).
    """

    def __init__(self, publish: PublishFn, route: Route, request_id: str | int | None = None) -> None:
        self.publish = publish
        self.route = route
        self.request_id = request_id
        self._lock = threading.Lock()
        self._sent = False

    @property
    def sent(self) -> bool:
        return self._sent

    @property
    def properties(self) -> dict[str, Any] | None:
        if self.route.correlation_data is None:
            return None
        return {"correlation_data": self.route.correlation_data}

    def ok(self, data: dict[str, Any] | None = None) -> bool:
        return self._send({"id": self.request_id, "status": "ok", "data": data or {}, "error": None})

    def error(self, code: str, message: str, **extra: Any) -> bool:
        err = error_body(code, message, **extra)
        return self._send({"id": self.request_id, "status": "error", "data": {}, "error": err})

    def _send(self, body: dict[str, Any]) -> bool:
        with self._lock:
            if self._sent:
                logger.warning("second final reply for id %r dropped (%s)", self.request_id, body["status"])
                return False
            self._sent = True
        # Publish outside our lock (paho has its own); a failing publish is logged, not raised.
        try:
            self.publish(self.route.topic, body, qos=1, retain=False, properties=self.properties)
        except Exception:
            logger.exception("could not publish the reply for id %r", self.request_id)
        return True


class JobSink:
    """Base of the engine sinks that complete a ``Reply``.

    The engine calls a sink on its worker (or encoder) thread, possibly before ``submit()`` has
    returned to the handler: events are handled one at a time, and a failure while publishing is
    answered as an ``internal`` error instead of raised into the engine.
    """

    def __init__(self, reply: Reply, request_id: str | int) -> None:
        self.reply = reply
        self.request_id = request_id
        self._lock = threading.Lock()

    def __call__(self, event: JobEvent) -> None:
        try:
            with self._lock:
                self._handle(event)
        except Exception:
            logger.exception("%s failed for id %r", type(self).__name__, self.request_id)
            self.reply.error("internal", "the appliance failed while answering; see its log")

    def _handle(self, event: JobEvent) -> None:
        raise NotImplementedError
