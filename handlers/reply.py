"""Reply routing and the one-final-reply guarantee.

Routing (docs/TOPICS.md, "Public and named requests, and the reply space"): the MQTT 5 Response
Topic (with its Correlation Data) wins; else ``reply_to`` from the payload; else the default:
``{base}/response/<kind>`` for a public request, ``replies/<sender>/<kind>`` for a named sender's.
A caller-chosen topic must lie in the reply space (``appliance.topics.check_reply_topic``); one
that does not is not used: the request is answered with an error on the default topic that says
why, and is not executed.

Every reply but the shared ``{base}/response/<kind>`` is private: its plain-text copy goes to
``<reply topic>/text`` and its stream under ``<reply topic>/stream/<id>``, never to the shared
topics. ``Reply`` sends ``{id, status, data, error}`` (and the text copy, when the request kind
has one) at most once, from whichever thread finishes the request; a second attempt is logged and
dropped, so a handler bug can never double-answer. With a journal bound, the reply is journaled
before it is published and marked delivered when the broker acknowledges it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from handlers.acceptance import JournalLike, Outgoing
from handlers.context import PublishFn, TopicsLike, default_text_bytes
from npu.engine.api import Done, Failed, JobEvent, Place

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Where a reply goes; ``refused`` says why the caller's own choice was not used.

    ``shared`` is True for the public ``{base}/response/<kind>``: only then do the text copy and
    the stream go to the shared ``<topic>/text`` and ``{base}/stream/<id>``.
    """

    topic: str
    correlation_data: bytes | None = None
    refused: str | None = None
    shared: bool = False

    @property
    def text_topic(self) -> str:
        return f"{self.topic}/text"

    def stream_topic(self, topics: TopicsLike, request_id: str) -> str:
        return topics.stream(request_id) if self.shared else f"{self.topic}/stream/{request_id}"

    def progress_topic(self, topics: TopicsLike, request_id: str) -> str:
        """Where the job's place and progress go: ``{base}/progress/<id>`` in public, else under
        the private reply topic (a named sender's stays in ``replies/<sender>/``)."""
        return topics.progress(request_id) if self.shared else f"{self.topic}/progress/{request_id}"


def route_reply(
    topics: TopicsLike,
    kind: str,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
    reply_to: Any = None,
    *,
    sender: str | None = None,
) -> Route:
    """Pick the reply topic for one request (see the module docstring)."""
    if sender is None:
        default = Route(topics.response(kind), shared=True)
    else:
        default = Route(topics.sender_response(sender, kind))
    if response_topic is not None:
        reason = topics.check_reply_topic(response_topic, sender)
        if reason is None:
            return Route(response_topic, correlation_data)
        return Route(default.topic, correlation_data, f"response topic refused: {reason}", default.shared)
    if reply_to is not None:
        if not isinstance(reply_to, str):
            return Route(default.topic, None, "reply_to must be a string topic", default.shared)
        reason = topics.check_reply_topic(reply_to, sender)
        if reason is None:
            return Route(reply_to)
        return Route(default.topic, None, f"reply_to refused: {reason}", default.shared)
    return default


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
        text_copy: also publish a plain-text copy on ``route.text_topic`` (chat), cut to fit one
            PubSubClient packet unless ``max_text_bytes`` says otherwise.
    """

    def __init__(self, publish: PublishFn, route: Route, request_id: str | int | None = None,
                 *, text_copy: bool = False) -> None:
        self.publish = publish
        self.route = route
        self.request_id = request_id
        self.text_copy = text_copy
        self.max_text_bytes = default_text_bytes(route.text_topic)
        self._lock = threading.Lock()
        self._sent = False
        self._journal: JournalLike | None = None
        self._seq: int | None = None

    @property
    def sent(self) -> bool:
        return self._sent

    @property
    def properties(self) -> dict[str, Any] | None:
        if self.route.correlation_data is None:
            return None
        return {"correlation_data": self.route.correlation_data}

    def bind(self, journal: JournalLike, seq: int) -> None:
        """Journal this reply (row ``seq``) before it is published."""
        self._journal, self._seq = journal, seq

    def ok(self, data: dict[str, Any] | None = None, *, text: str | None = None) -> bool:
        body = {"id": self.request_id, "status": "ok", "data": data or {}, "error": None}
        return self._send(body, text)

    def error(self, code: str, message: str, **extra: Any) -> bool:
        err = error_body(code, message, **extra)
        body = {"id": self.request_id, "status": "error", "data": {}, "error": err}
        return self._send(body, f"error: {message}")

    def _messages(self, body: dict[str, Any], text: str | None) -> list[Outgoing]:
        out = [Outgoing(self.route.topic, _json_bytes(body), self.route.correlation_data)]
        if self.text_copy and text is not None:
            out.append(Outgoing(self.route.text_topic, cut_utf8(text, self.max_text_bytes)))
        return out

    def _send(self, body: dict[str, Any], text: str | None) -> bool:
        with self._lock:
            if self._sent:
                logger.warning("second final reply for id %r dropped (%s)", self.request_id, body["status"])
                return False
            journal, seq = self._journal, self._seq
            if journal is not None and journal.closing and _is_stopping(body):
                # The appliance is stopping: the request stays accepted and runs after the restart.
                logger.info("request %r kept in the journal for the next start", self.request_id)
                self._sent = True
                return False
            self._sent = True
        messages = self._messages(body, text)
        if journal is not None and seq is not None:
            try:
                journal.replied(seq, messages)
            except Exception:
                logger.exception("could not journal the reply for id %r; sending it anyway", self.request_id)
        publish_all(self.publish, messages, journal, seq)
        return True


def publish_all(publish: PublishFn, messages: list[Outgoing] | tuple[Outgoing, ...],
                journal: JournalLike | None = None, seq: int | None = None) -> None:
    """Publish a final reply's messages (QoS 1); the first one's PUBACK marks the row delivered.

    Publishing happens outside every lock of ours (paho has its own); a failure is logged, not
    raised.
    """
    for i, msg in enumerate(messages):
        props = {"correlation_data": msg.correlation_data} if msg.correlation_data is not None else None
        kwargs: dict[str, Any] = {}
        if i == 0 and journal is not None and seq is not None:
            kwargs["on_delivered"] = lambda: journal.delivered(seq)
        try:
            publish(msg.topic, msg.payload, qos=1, retain=False, properties=props, **kwargs)
        except Exception:
            logger.exception("could not publish a reply on %s", msg.topic)


def _is_stopping(body: dict[str, Any]) -> bool:
    err = body.get("error") or {}
    return body.get("status") == "error" and err.get("code") == "unavailable"


def _json_bytes(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates (echoed ids): escaped JSON is still valid
        return json.dumps(body, separators=(",", ":")).encode("ascii")


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
        self.progress: ProgressTopic | None = None  # set by a sink whose job reports its place
        self.ended = False

    def __call__(self, event: JobEvent) -> None:
        try:
            with self._lock:
                if isinstance(event, Place):
                    if self.progress is not None and not self.ended:
                        self.progress.place(event)
                    return
                if self.ended:
                    return  # nothing follows a job's end (a preview or a place that raced it)
                self._handle(event)
                if isinstance(event, Done | Failed):
                    self.ended = True
                    if self.progress is not None:
                        self.progress.done(event)
        except Exception:
            logger.exception("%s failed for id %r", type(self).__name__, self.request_id)
            self.reply.error("internal", "the appliance failed while answering; see its log")

    def _handle(self, event: JobEvent) -> None:
        raise NotImplementedError


class ProgressTopic:
    """A job's place (queued at a position, running) and its end, on its progress topic.

    ``{id, state, position, eta_s, step, steps}``: ``state`` is ``queued`` (``position`` 1 = next,
    ``eta_s`` the expected wait), ``running`` (``eta_s`` until it ends, ``step`` of ``steps``) or
    ``done`` (with ``error``, the code, when it failed). QoS 0, not retained: a place is news only
    while it is current. The engine sends places when they change, at most about once a second.
    """

    def __init__(self, publish: PublishFn, topic: str, request_id: str | int) -> None:
        self.publish = publish
        self.topic = topic
        self.request_id = request_id

    def place(self, event: Place) -> None:
        self._send({"id": self.request_id, "state": event.state, "position": event.position,
                    "eta_s": event.eta_s, "step": event.step, "steps": event.steps})

    def done(self, event: Done | Failed) -> None:
        body: dict[str, Any] = {"id": self.request_id, "state": "done", "position": None, "eta_s": 0.0}
        if isinstance(event, Failed):
            body["error"] = event.error.code.value
        self._send(body)

    def _send(self, body: dict[str, Any]) -> None:
        try:
            self.publish(self.topic, body, qos=0, retain=False)
        except Exception:
            logger.exception("could not publish progress on %s", self.topic)
