"""The FastAPI application over an engine; ``bridge_http.server`` serves it with uvicorn.

With ``http.api_key`` set, the OpenAPI schema needs the key like ``/v1/*``; the interactive
``/docs`` and ``/redoc`` pages are never served (a browser page cannot send the key). Clients
written for llama.cpp's server call the OpenAI routes without ``/v1``: those are served too, by
the same handlers behind the same key. Browser clients get CORS answers for the origins in
``http.cors_origins`` only.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute

from bridge_http.audio import UPLOAD_LIMITS
from bridge_http.audio import router as audio_router
from bridge_http.auth import require_api_key
from bridge_http.body_guard import BodyGuard
from bridge_http.bridge import Bridge, BridgeSettings
from bridge_http.completions import router as completions_router
from bridge_http.displays import DisplayBoard
from bridge_http.errors import install_error_handlers
from bridge_http.images import files_router as image_files_router
from bridge_http.images import router as images_router
from bridge_http.live import LiveFeed
from bridge_http.queue import router as queue_router
from bridge_http.status import models_router, status_router
from bridge_http.ui import UI
from bridge_http.ui import api_router as ui_api_router
from bridge_http.ui import pages_router as ui_pages_router
from npu.engine.api import EngineClient

# llama.cpp's server answers these without the /v1 prefix, and its clients call them so.
UNVERSIONED = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model_id}")


def create_app(engine: EngineClient, settings: BridgeSettings | None = None) -> FastAPI:
    settings = settings or BridgeSettings()
    app = FastAPI(title="appliance", summary="OpenAI-compatible bridge to the resident models", docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.bridge = Bridge(engine, settings)
    install_error_handlers(app)
    app.include_router(completions_router)
    app.include_router(images_router)
    app.include_router(audio_router)
    app.include_router(image_files_router)
    app.include_router(models_router)
    app.include_router(queue_router)
    app.include_router(status_router)
    add_unversioned_routes(app, [completions_router, models_router])
    app.state.ui = UI(LiveFeed(engine), DisplayBoard())  # the console at / and /display/<name>
    app.include_router(ui_api_router)
    app.include_router(ui_pages_router)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_api_key)])
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    # Added last = outermost: CORS headers go on every answer, the guard's refusals included.
    app.add_middleware(BodyGuard, max_body=settings.max_body, uploads=UPLOAD_LIMITS)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"], max_age=600,
        )
    return app


def add_unversioned_routes(app: FastAPI, routers: list[APIRouter]) -> None:
    """Serve each route of ``UNVERSIONED`` without ``/v1`` too: same endpoint, same dependencies."""
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and route.path in UNVERSIONED:
                app.add_api_route(
                    route.path.removeprefix("/v1"), route.endpoint, methods=sorted(route.methods or ()),
                    dependencies=[*router.dependencies, *route.dependencies],
                    name=f"{route.name}_unversioned", include_in_schema=False,
                    response_class=route.response_class,
                )
