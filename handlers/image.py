"""``{base}/request/image``: a prompt in, an image on a display topic out.

The image goes, retained and as raw bytes, to ``{base}/display/<display>`` (MQTT 5 content type
set), then its description, retained JSON, to ``{base}/display/<display>/meta``; a display that
connects later still shows the latest picture. The reply carries the description, never the bytes.
With ``stream: true`` progress goes to the request's stream topic (``{base}/stream/<id>``, or under
a private reply topic) as ``{id, stage, step, steps, done}``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from handlers.chat import check_chat_id, deadline_for, reply_engine_error
from handlers.context import (
    PENDING,
    HandlerContext,
    HandlerError,
    RequestMeta,
    engine_request_id,
    queue_sender,
)
from handlers.payloads import ImagePayload
from handlers.reply import JobSink, Reply
from npu.diffusion.params import ImageParams
from npu.engine.api import Done, EngineError, Failed, ImageProgress, ImageRequest, ImageResult, JobEvent

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

    def _handle(self, event: JobEvent) -> None:
        if isinstance(event, ImageProgress):
            self._progress({"stage": event.stage, "step": event.step, "steps": event.steps, "done": False})
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
    params = ImageParams(
        prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width, height=req.height,
        steps=req.steps, seed=req.seed, guidance_scale=req.guidance_scale,
        format=req.format or defaults.format,
        quality=req.quality or defaults.quality, max_bytes=defaults.max_bytes,
    )
    request = ImageRequest(params, model=req.model, deadline=deadline,
                           request_id=engine_request_id(request_id, meta.sender),
                           sender=queue_sender(meta.sender))
    sink = ImageSink(req, ctx, reply, request_id, display)
    try:
        ctx.engine.submit(request, sink)
    except EngineError as err:
        if not reply.sent:
            reply_engine_error(reply, err)
    return PENDING
