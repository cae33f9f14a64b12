"""``GET /v1/queue``: how long the queue is and when a request sent now would start.

The same figures as MQTT's retained ``{base}/queue``, plus the measured figures they come from
(per model and phase: seconds per unit of work, steps per unit, units per job). A streamed
request hears its own place as SSE comments (``bridge_http.streaming``).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from bridge_http.auth import require_api_key
from npu.engine.api import EngineClient

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.get("/v1/queue")
async def handle_queue(request: Request) -> dict[str, Any]:
    engine: EngineClient = request.app.state.bridge.engine
    info = engine.queue()
    return {"object": "queue", "length": info.length, "running": info.running, "queue_max": info.queue_max,
            "eta_s": info.eta_s, "figures": info.figures}
