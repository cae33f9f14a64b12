"""Control requests: ``cancel``, ``health_check``, ``pause``, ``resume``, ``reload``, ``restart``, ``sim``.

Replies go to ``{base}/response/<op>`` (or the caller's reply topic). ``reload`` blocks until the
models are reloaded, so it runs on a short-lived thread and answers from there: the dispatcher
keeps serving chat requests meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from handlers.context import PENDING, HandlerContext, HandlerError, RequestMeta, engine_request_id
from handlers.payloads import (
    CancelPayload,
    HealthPayload,
    PausePayload,
    ReloadPayload,
    RestartPayload,
    ResumePayload,
    SimPayload,
)
from handlers.reply import Reply
from npu.engine.api import EngineError

logger = logging.getLogger(__name__)


def _state(ctx: HandlerContext) -> dict[str, Any]:
    return dataclasses.asdict(ctx.engine.state())


def handle_cancel(req: CancelPayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> dict[str, Any]:
    """Cancel the sender's jobs submitted with ``id``; each then ends with ``cancelled``.

    A named sender reaches only its own jobs, a public cancel only public ones.
    """
    if req.id is None:
        raise HandlerError("bad_request", "cancel needs the id of the request to cancel")
    count = ctx.engine.cancel(engine_request_id(req.id, meta.sender))
    return {"cancelled": count}


def handle_health_check(
    req: HealthPayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta
) -> dict[str, Any]:
    return {"state": _state(ctx), "models": [dataclasses.asdict(m) for m in ctx.engine.models()]}


def handle_pause(req: PausePayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> dict[str, Any]:
    if req.paused:
        ctx.engine.pause(req.reason or "paused by request")
    else:
        ctx.engine.resume()
    return {"state": _state(ctx)}


def handle_restart(
    req: RestartPayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta
) -> dict[str, Any]:
    """Start a reset and reload of every device; progress follows on ``{base}/event`` and ``state``."""
    devices = ctx.engine.restart(req.reason or "restart requested")
    return {"restarting": devices, "state": _state(ctx)}


def handle_sim(req: SimPayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> dict[str, Any]:
    if ctx.sim is None:
        raise HandlerError("bad_request", "sim controls a simulated card: set device.backend: sim")
    values = req.model_dump(exclude_none=True, exclude={"id", "reply_to", "device"})
    states = ctx.sim.set(req.device, **values)
    return {"devices": {str(d): dataclasses.asdict(s) for d, s in states.items()}}


def handle_resume(req: ResumePayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> dict[str, Any]:
    ctx.engine.resume()
    return {"state": _state(ctx)}


def handle_reload(req: ReloadPayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> Any:
    """Reload one model (or all) on a worker thread; the reply comes when it is done."""

    def run() -> None:
        start = time.monotonic()
        try:
            ctx.engine.reload(req.model)
        except EngineError as err:
            reply.error(err.code.value, err.message, retry_after=err.retry_after)
        except Exception:
            logger.exception("reload failed")
            reply.error("internal", "reload failed; see the appliance log")
        else:
            reply.ok({"model": req.model, "ms": round((time.monotonic() - start) * 1000, 1)})

    threading.Thread(target=run, name="handler-reload", daemon=True).start()
    return PENDING
