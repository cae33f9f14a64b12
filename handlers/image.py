"""``{base}/request/image``: a prompt in, an image on a display topic out.

The image goes, retained and as raw bytes, to ``{base}/display/<display>`` (MQTT 5 content type
set), then its description, retained JSON, to ``{base}/display/<display>/meta``; a display that
connects later still shows the latest picture. The reply carries the description, never the bytes.
With ``stream: true`` progress goes to the request's stream topic (``{base}/stream/<id>``, or under
a private reply topic) as ``{id, stage, step, steps, done}``. With ``preview`` (the request's, else
the display's rule in ``images``), a small JPEG of the picture so far goes to
``{base}/display/<display>/preview`` after each UNet step, not retained, and none after the
final picture. The job's place in the queue goes to its progress topic, as for chat.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from handlers.chat import check_chat_id, deadline_for, find_persona, reply_engine_error
from handlers.context import (
    PENDING,
    HandlerContext,
    HandlerError,
    PublishFn,
    RequestMeta,
    TopicsLike,
    engine_request_id,
    queue_sender,
)
from handlers.moderation import Gate, gated
from handlers.payloads import ImagePayload
from handlers.reply import JobSink, ProgressTopic, Reply
from npu.diffusion.params import ImageParams
from npu.engine.api import (
    Done,
    EngineError,
    Failed,
    ImagePreview,
    ImageProgress,
    ImageRequest,
    ImageResult,
    JobEvent,
    Persona,
)

logger = logging.getLogger(__name__)


def image_meta(request_id: str | int, prompt: str, result: ImageResult, display: str) -> dict[str, Any]:
    out = result.output
    return {
        "id": request_id, "prompt": prompt, "model": result.model, "display": display,
        "seed": out.seed, "steps": out.steps, "width": out.width, "height": out.height,
        "content_type": out.content_type, "bytes": len(out.data),
        "sha256": hashlib.sha256(out.data).hexdigest(),
        "quality": out.quality, "prompt_truncated": out.truncated, "created": int(time.time()),
        "ms": round(result.total_ms, 1),
    }


class ImageSink(JobSink):
    """Publishes the image, its description and the reply."""

    def __init__(self, req: ImagePayload, ctx: HandlerContext, reply: Reply, request_id: str | int,
                 display: str) -> None:
        super().__init__(reply, request_id)
        self.req = req
        self.ctx = ctx
        self.display = display
        self.stream_topic = reply.route.stream_topic(ctx.topics, str(request_id)) if req.stream else None
        self.progress = ProgressTopic(ctx.publish, reply.route.progress_topic(ctx.topics, str(request_id)),
                                      request_id)

    def _handle(self, event: JobEvent) -> None:
        if isinstance(event, ImageProgress):
            self._progress({"stage": event.stage, "step": event.step, "steps": event.steps, "done": False})
        elif isinstance(event, ImagePreview):
            # Not retained: a display that connects later gets the finished picture, not a draft.
            self.ctx.publish(self.ctx.topics.display_preview(self.display), event.data, qos=0, retain=False,
                             properties={"content_type": event.content_type})
        elif isinstance(event, Done) and isinstance(event.result, ImageResult):
            out = event.result.output
            meta = image_meta(self.request_id, self.req.prompt, event.result, self.display)
            topics = self.ctx.topics
            self.ctx.publish(topics.display(self.display), out.data, qos=1, retain=True,
                             properties={"content_type": out.content_type})
            self.ctx.publish(topics.display_meta(self.display), meta, qos=1, retain=True,
                             properties={"content_type": "application/json"})
            self._progress({"stage": "done", "step": out.steps, "steps": out.steps, "done": True})
            self.reply.ok({**meta, "topic": topics.display(self.display)})
        elif isinstance(event, Failed):
            self._progress({"done": True, "error": event.error.code.value})
            reply_engine_error(self.reply, event.error)

    def _progress(self, body: dict[str, Any]) -> None:
        if self.stream_topic is not None:
            self.ctx.publish(self.stream_topic, {"id": self.request_id, **body}, qos=0)


def styled(req: ImagePayload, persona: Persona | None) -> tuple[str, str, int]:
    """The prompt, negative prompt and steps after the persona's image style: its words around the
    prompt, its negative prompt and steps where the request gives none."""
    if persona is None or persona.image is None:
        return req.prompt, req.negative_prompt, req.steps
    style, given = persona.image, req.model_fields_set
    negative = req.negative_prompt if "negative_prompt" in given else (style.negative_prompt or "")
    steps = req.steps if "steps" in given or style.steps is None else style.steps
    return persona.image_prompt(req.prompt), negative, steps


def handle_image(req: ImagePayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> Any:
    request_id = reply.request_id
    if request_id is None:
        raise HandlerError("bad_request", "an image request needs an id")
    check_chat_id(request_id)
    defaults = ctx.images
    display = req.display or defaults.display
    try:
        ctx.topics.display(display)
    except ValueError as exc:
        raise HandlerError("bad_request", str(exc)) from exc
    deadline = deadline_for(req, meta.received_at, meta.message_expiry, ctx.limits.request_timeout)
    prompt, negative, steps = styled(req, find_persona(ctx, req.persona, "") if req.persona else None)
    params = ImageParams(
        prompt=prompt, negative_prompt=negative, width=req.width, height=req.height,
        steps=steps, seed=req.seed, guidance_scale=req.guidance_scale,
        format=req.format or defaults.format,
        quality=req.quality or defaults.quality, max_bytes=defaults.max_bytes,
    )
    request = ImageRequest(params, preview=defaults.preview_for(display, req.preview), model=req.model,
                           deadline=deadline,
                           request_id=engine_request_id(request_id, meta.sender),
                           sender=queue_sender(meta.sender))
    sink = ImageSink(req, ctx, reply, request_id, display)

    def submit() -> None:
        try:
            ctx.engine.submit(request, sink)
        except EngineError as err:
            if not reply.sent:
                reply_engine_error(reply, err)

    gated(ctx.moderation, ctx.engine, "image", req.prompt, display=display, reply=reply, sender=meta.sender,
          submit=submit, refuse=lambda _: show_curtain(ctx, display, request_id))
    return PENDING


def show_curtain(ctx: HandlerContext, display: str, request_id: str | int) -> None:
    """A refused picture's display shows the curtain (retained, like a picture), and its
    description says it was refused, never what was asked."""
    assert ctx.moderation is not None
    publish_curtain(ctx.publish, ctx.topics, ctx.moderation, display, request_id)


def publish_curtain(publish: PublishFn, topics: TopicsLike, gate: Gate, display: str,
                    request_id: str | int) -> None:
    """The curtain and its description on a display's retained topics (MQTT's and the console's)."""
    publish(topics.display(display), gate.curtain, qos=1, retain=True,
            properties={"content_type": gate.curtain_type})
    meta = {"id": request_id, "display": display, "refused": True, "content_type": gate.curtain_type,
            "bytes": len(gate.curtain), "sha256": hashlib.sha256(gate.curtain).hexdigest(),
            "created": int(time.time())}
    publish(topics.display_meta(display), meta, qos=1, retain=True,
            properties={"content_type": "application/json"})
