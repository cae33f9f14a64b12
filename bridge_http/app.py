"""The FastAPI application over an engine; ``bridge_http.server`` serves it with uvicorn."""

from __future__ import annotations

from fastapi import FastAPI

from bridge_http.bridge import Bridge, BridgeSettings
from bridge_http.completions import router as completions_router
from bridge_http.errors import install_error_handlers
from bridge_http.images import files_router as image_files_router
from bridge_http.images import router as images_router
from bridge_http.status import models_router, status_router
from npu.engine.engine import Engine


def create_app(engine: Engine, settings: BridgeSettings | None = None) -> FastAPI:
    app = FastAPI(title="appliance", summary="OpenAI-compatible bridge to the resident models", docs_url=None,
                  redoc_url=None)
    app.state.bridge = Bridge(engine, settings or BridgeSettings())
    install_error_handlers(app)
    app.include_router(completions_router)
    app.include_router(images_router)
    app.include_router(image_files_router)
    app.include_router(models_router)
    app.include_router(status_router)
    return app
