"""``{base}/request/chat``: a prompt in, a completion out (streamed and/or whole).

The handler turns the payload into the engine's ``ChatRequest`` and returns at once; the engine's
worker thread then calls the sink, which only publishes (paho queues; nothing blocks):

- ``stream: true``: ``{id, seq, delta, done}`` on the stream topic (``{base}/stream/<id>`` for a
  public request, ``<reply topic>/stream/<id>`` for a private one), seq from 0, ending with
  ``done: true`` and an empty delta (plus ``error`` when the job failed); with ``chunk``
  (``sentence``, or ``line`` with a ``width``) each delta is a whole sentence or line with its
  ``index`` from 0, so a speaker or a sign never gets half a word;
- its place on the progress topic (``{base}/progress/<id>``, or under a private reply topic):
  ``{id, state: queued|running|done, position, eta_s, step, steps}``;
- the final reply ``{id, status, data: {text, model, finish_reason, usage, ms}, error}``;
- a plain-text copy on ``<reply topic>/text`` cut to ``max_bytes`` on a UTF-8 boundary for
  microcontrollers (an error becomes ``error: <message>`` there, so they are never left waiting);
  ``Reply`` sends it with the reply.

Ids go into stream topics, so chat ids must be one topic level: ids with ``/``, ``+``, ``#`` or NUL
are refused with ``bad_request``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

from handlers.context import (
    PENDING,
    HandlerContext,
    HandlerError,
    RequestMeta,
    engine_request_id,
    queue_sender,
)
from handlers.moderation import gated
from handlers.payloads import ChatPayload, ImagePayload
from handlers.reply import JobSink, ProgressTopic, Reply
from handlers.spoken import SpokenAnswer
from handlers.structured import is_json_request, structured_data, with_constraint
from npu.engine.api import (
    ChatRequest,
    ChatResult,
    Delta,
    Done,
    EngineError,
    Failed,
    JobEvent,
    Persona,
    Sink,
    persona_missing,
)
from npu.llm.params import GenerationParams, max_prompt_chars
from npu.sentences import Chunker
from npu.speech.voices import resolve_voice

logger = logging.getLogger(__name__)

KIND = "chat"
_BAD_ID_CHARS = ("/", "+", "#", "\x00")
_PARAM_FIELDS = (
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "seed",
)


def build_params(req: ChatPayload, persona: Persona | None = None) -> GenerationParams:
    """``GenerationParams`` from the payload; fields left out keep the persona's defaults, then the
    engine's."""
    given: dict[str, Any] = {f: getattr(req, f) for f in _PARAM_FIELDS if getattr(req, f) is not None}
    if req.stop is not None:
        given["stop"] = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    try:
        return GenerationParams(**(persona.params(given) if persona is not None else given))
    except ValueError as exc:
        raise HandlerError("bad_request", str(exc)) from exc


def find_persona(ctx: HandlerContext, name: str | None, model: str | None) -> Persona | None:
    """The persona a request names (as ``persona``, or as ``model`` like over HTTP); one that names
    neither a persona nor a model gets the scene's default persona, if it has one."""
    if name is None:
        return ctx.engine.persona(model)
    persona = ctx.engine.persona(name)
    if persona is None:
        missing = persona_missing(name, [p.name for p in ctx.engine.personas()])
        raise HandlerError(missing.code.value, missing.message)
    return persona


def deadline_for(req: ChatPayload | ImagePayload, received_at: float, message_expiry: int | None,
                 default_timeout: float | None = None) -> float | None:
    """The earliest of MQTT 5 Message Expiry and ``timeout_s``, as a ``time.monotonic()`` value."""
    candidates = [received_at + float(s) for s in (message_expiry, req.timeout_s) if s is not None]
    if not candidates and default_timeout is not None:
        candidates.append(received_at + default_timeout)
    return min(candidates) if candidates else None


def check_prompt_chars(model: str | None, messages: list[dict[str, str]], ctx: HandlerContext) -> None:
    """Refuse a prompt too long for the model's context before the engine tokenizes it.

    Tokenizing runs on the dispatcher's thread, and megabytes of text take seconds. A request
    that names no model is held to the largest context, so this never refuses what could fit.
    """
    contexts = [m.context_length for m in ctx.engine.models()
                if m.kind == "chat" and m.context_length and model in (None, m.id)]
    if not contexts:
        return  # an unknown model: the engine says so
    context = max(contexts)
    chars, limit = sum(len(m["content"]) for m in messages), max_prompt_chars(context)
    if chars > limit:
        raise HandlerError("context_length_exceeded", f"the prompt is {chars} characters; a model with a "
                           f"context of {context} tokens reads at most {limit}")


def check_chat_id(request_id: str | int) -> None:
    text = str(request_id)
    if not text:
        raise HandlerError("bad_request", "id must not be empty")
    bad = [c for c in _BAD_ID_CHARS if c in text]
    if bad:
        shown = ", ".join("NUL" if c == "\x00" else repr(c) for c in bad)
        raise HandlerError(
            "bad_request", f"id {text[:64]!r} cannot be used in a stream topic: it contains {shown}"
        )


class ChatSink(JobSink):
    """Publishes the stream and completes the reply (with its text copy); never blocks."""

    def __init__(self, req: ChatPayload, ctx: HandlerContext, reply: Reply, request_id: str | int,
                 shown_model: str | None = None) -> None:
        super().__init__(reply, request_id)
        self.ctx = ctx
        self.shown_model = shown_model  # the persona a request asked for, named as HTTP names it
        self.json_answer = is_json_request(req)
        if req.max_bytes:
            reply.max_text_bytes = req.max_bytes
        streamed = req.stream or req.chunk is not None
        self.stream_topic = reply.route.stream_topic(ctx.topics, str(request_id)) if streamed else None
        self.progress = ProgressTopic(ctx.publish, reply.route.progress_topic(ctx.topics, str(request_id)),
                                      request_id)
        self._seq = itertools.count()
        # "chunk": whole sentences or lines on the stream, each with its index (npu/sentences.py)
        self.chunker = Chunker(req.chunk, req.width) if req.chunk is not None else None
        self._index = itertools.count()

    def _handle(self, event: JobEvent) -> None:
        if isinstance(event, Delta):
            if self.stream_topic is not None and event.text:
                self._pieces(event.text)
        elif isinstance(event, Done):
            if self.stream_topic is not None:
                self._pieces(None)
                self._stream("", done=True)
            r = event.result
            assert isinstance(r, ChatResult)  # a chat job's result
            usage = r.usage
            self.reply.ok({
                "text": r.text,
                "model": self.shown_model or r.model,
                "finish_reason": r.finish_reason,
                "usage": {
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                    "cached_tokens": usage.cached_tokens,
                },
                "ms": round(r.total_ms, 1),
                **structured_data(r, self.json_answer),
            }, text=r.text)
        elif isinstance(event, Failed):
            err = event.error
            if self.stream_topic is not None:
                self._pieces(None)  # what was generated before the failure, whole
                self._stream("", done=True, error=err.code.value)
            reply_engine_error(self.reply, err)

    def _pieces(self, text: str | None) -> None:
        """Stream ``text`` as it came, or, with ``chunk``, the whole units it completed (None: the
        answer ended, so the units still held go out)."""
        if self.chunker is None:
            if text:
                self._stream(text, done=False)
            return
        for unit in self.chunker.feed(text) if text is not None else self.chunker.flush():
            self._stream(unit, done=False, index=next(self._index))

    def _stream(self, delta: str, *, done: bool, error: str | None = None, index: int | None = None) -> None:
        body: dict[str, Any] = {"id": self.request_id, "seq": next(self._seq), "delta": delta, "done": done}
        if index is not None:
            body["index"] = index
        if error is not None:
            body["error"] = error
        assert self.stream_topic is not None
        self.ctx.publish(self.stream_topic, body, qos=1)


def reply_engine_error(reply: Reply, err: EngineError) -> None:
    """The engine's typed error as an error reply; ``busy`` carries ``retry_after`` (seconds)."""
    reply.error(err.code.value, err.message, retry_after=err.retry_after)


def spoken_answer(sink: Sink, req: ChatPayload, ctx: HandlerContext, request_id: str | int,
                  meta: RequestMeta) -> Sink:
    assert req.speak is not None
    try:
        voice = resolve_voice(req.voice, [m.id for m in ctx.engine.models() if m.kind == "tts"])
        return SpokenAnswer(sink, ctx, req.speak, request_id, voice, queue_sender(meta.sender))
    except ValueError as exc:
        raise HandlerError("bad_request", str(exc)) from exc


def handle_chat(req: ChatPayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> Any:
    """Submit the chat job; the sink completes ``reply`` later, so this returns ``PENDING``."""
    request_id = reply.request_id
    if request_id is None:  # the registry assigns one; direct callers must too
        raise HandlerError("bad_request", "a chat request needs an id")
    check_chat_id(request_id)
    persona = find_persona(ctx, req.persona, req.model)
    params = build_params(req, persona)
    params = with_constraint(params, req)  # schema, format, choices
    deadline = deadline_for(req, meta.received_at, meta.message_expiry, ctx.limits.request_timeout)
    if deadline is not None and deadline <= time.monotonic():
        raise HandlerError("expired", "the request expired before it could be queued")
    # A bare prompt (a sensor's or an Arduino's text) is one user turn of a chat: instruct models
    # answer it properly only through their chat template.
    if req.messages is not None:
        messages = [m.model_dump() for m in req.messages]
    elif req.prompt and req.prompt.strip():
        messages = [{"role": "user", "content": req.prompt}]
    else:
        raise HandlerError("bad_request", "the prompt is empty")
    model = req.model
    if persona is not None:
        own = model if model != persona.name else None  # a model the request names beside the persona
        messages, model = persona.messages(messages), own or persona.model
    check_prompt_chars(model, messages, ctx)
    try:
        request = ChatRequest(
            model=model,
            messages=messages,
            params=params,
            deadline=deadline,
            request_id=engine_request_id(request_id, meta.sender),
            sender=queue_sender(meta.sender),
        )
    except ValueError as exc:
        raise HandlerError("bad_request", str(exc)) from exc
    # As over HTTP, the answer names the persona asked for (by ``persona``, by ``model`` or as the
    # scene's default), unless the request named a model of its own beside it.
    shown = persona.name if persona is not None and req.model in (None, persona.name) else None
    sink: Sink = ChatSink(req, ctx, reply, request_id, shown)
    if req.speak is not None:  # spoken sentence by sentence as it is written
        sink = spoken_answer(sink, req, ctx, request_id, meta)

    def submit() -> None:
        try:
            ctx.engine.submit(request, sink)
        except EngineError as err:
            if not reply.sent:
                reply_engine_error(reply, err)
            return
        logger.debug("chat %r queued (%s)", request_id, dataclasses.asdict(params))

    typed = (req.prompt or "") if req.messages is None else "\n".join(m.content for m in req.messages)
    gated(ctx.moderation, ctx.engine, "chat", typed, display=None, reply=reply, sender=meta.sender,
          submit=submit)
    return PENDING
