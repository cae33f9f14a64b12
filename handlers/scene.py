"""``{base}/request/scene``: switch the installation's scene now (``appliance.scenes``).

The payload is the scene's name as plain text (what a Home Assistant select sends) or
``{"id": ..., "scene": "night"}``. The reply carries what ``{base}/scene`` retains; an unknown
scene is a ``bad_request`` that lists the scenes. The switch holds until the next scheduled start.
"""

from __future__ import annotations

from typing import Any

from handlers.context import HandlerContext, HandlerError, RequestMeta
from handlers.payloads import ScenePayload
from handlers.reply import Reply


def handle_scene(req: ScenePayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> dict[str, Any]:
    if ctx.scenes is None or not ctx.scenes.names():
        raise HandlerError("bad_request", "this appliance has no scenes (config scenes:)")
    try:
        return ctx.scenes.switch(req.scene.strip(), "request")
    except ValueError as exc:
        raise HandlerError("bad_request", str(exc)) from exc
