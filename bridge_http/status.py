"""``GET /v1/models``, ``GET /health`` and ``GET /metrics``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge_http.auth import require_api_key
from bridge_http.bridge import Bridge
from bridge_http.errors import OpenAIError
from npu.engine.api import EngineClient, ModelInfo

READY = ("idle", "busy")

models_router = APIRouter(dependencies=[Depends(require_api_key)])
status_router = APIRouter()


def model_card(info: ModelInfo, created: int) -> dict[str, Any]:
    card: dict[str, Any] = {"id": info.id, "object": "model", "created": created, "owned_by": "appliance"}
    if info.context_length is not None:
        card["max_model_len"] = info.context_length  # vLLM's name; clients size prompts with it
    return card


def model_cards(bridge: Bridge) -> list[dict[str, Any]]:
    """Every name a client may send as ``model``: the models, their aliases and the personas of the
    scene (an alias or a persona names the model it runs on as its ``parent``, as vLLM does for
    adapters)."""
    infos = bridge.engine.models()
    cards = [model_card(m, bridge.created) for m in infos]
    for info in infos:
        cards += [{**model_card(info, bridge.created), "id": alias, "parent": info.id}
                  for alias in info.aliases or ()]
    by_id = {m.id: m for m in infos}
    for persona in bridge.engine.personas():
        parent = by_id.get(persona.model or "")
        card = model_card(parent, bridge.created) if parent is not None else {
            "object": "model", "created": bridge.created, "owned_by": "appliance"}
        cards.append({**card, "id": persona.name, "parent": persona.model, "persona": True})
    return cards


@models_router.get("/v1/models")
async def handle_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": model_cards(request.app.state.bridge)}


@models_router.get("/v1/models/{model_id}")
async def handle_model(model_id: str, request: Request) -> dict[str, Any]:
    for card in model_cards(request.app.state.bridge):
        if card["id"] == model_id:
            return card
    raise OpenAIError(404, f"no model {model_id!r} here", param="model", code="model_not_found")


@status_router.get("/health")
async def handle_health(request: Request) -> Response:
    """200 when requests are being taken; 503 (with the reason) while loading, paused or recovering."""
    engine: EngineClient = request.app.state.bridge.engine
    state = engine.state()
    body = {
        "status": "ok" if state.state in READY else "unavailable",
        **asdict(state),
        "models": [
            {"id": m.id, "kind": m.kind, "loaded": m.loaded, "backend": m.backend} for m in engine.models()
        ],
        "jobs_done": engine.jobs_done,
        "jobs_failed": engine.jobs_failed,
        "devices": [
            {**device.reading.as_dict(), "thermal": device.thermal, "recovering": device.recovering,
             "failed": device.failed}
            for device in engine.devices()
            if device.reading is not None
        ],
    }
    if state.state in READY:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


@status_router.get("/metrics")
async def handle_metrics(request: Request) -> Response:
    engine: EngineClient = request.app.state.bridge.engine
    registry = engine.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
