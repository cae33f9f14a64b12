"""The browser pages: the operator's console at ``GET /`` and a kiosk display at ``GET /display/<name>``.

The pages themselves are static files from the package (``bridge_http/static``), sent with a
strict Content-Security-Policy: scripts, styles and fonts from this origin only, no inline script
or style, no frames, no other origin to talk to. They hold no data: everything live comes from
the streams below, which need the API key (``Authorization: Bearer``, sent by ``fetch``; the key
never goes into a URL), and every action is a POST with the key. Text from prompts and models is
put into the page with ``textContent`` only.

- ``GET /console/auth``: whether the key is needed and whether the one sent is right (never a 401).
- ``GET /console/events``: the console's one stream (``bridge_http/live.py``).
- ``POST /console/pause|resume|reload|restart``: the controls; ``restart`` wants ``{"confirm": true}``;
  ``pause`` takes an optional ``{"reason"}`` and, like ``resume``, works without a body.
- ``POST /console/image``: an image prompt, answered as a stream of progress, previews and the result.
- ``GET /display/<name>/events``: a display's stream (``bridge_http/displays.py``).
- ``GET /display/<name>/image/<token>``: a picture; the unguessable token is its key.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from bridge_http.auth import require_api_key
from bridge_http.bridge import Bridge
from bridge_http.displays import DisplayBoard
from bridge_http.errors import OpenAIError
from bridge_http.fanout import sse
from bridge_http.image_schemas import SIZE
from bridge_http.images import image_jobs
from bridge_http.jobs import JobGroup
from bridge_http.live import LiveFeed
from npu.diffusion.params import DEFAULT_STEPS
from npu.engine.api import (
    Done,
    EngineClient,
    EngineError,
    ErrorCode,
    Failed,
    ImagePreview,
    ImageProgress,
    ImageResult,
)

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
               ".svg": "image/svg+xml"}
STREAM_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
DISPLAY_NAME = re.compile(r"^[\w.-]{1,64}$")

# Hands a console picture to a display: the appliance publishes it on the display's MQTT topic
# (and the board gets it back from the broker); without MQTT the board shows it directly.
DisplayOut = Callable[[str, str, ImageResult], None]
PreviewOut = Callable[[str, ImagePreview], None]  # the same for a step preview (display/<name>/preview)
PREVIEW_PIXELS = 256  # a console preview's longer side, as images.preview_size's default


@dataclass
class UI:
    live: LiveFeed
    displays: DisplayBoard
    display_out: DisplayOut | None = None
    preview_out: PreviewOut | None = None
    engine: EngineClient | None = None  # the image box's engine (None: the bridge's): the gate may trust it
    engine_for: Callable[[str], EngineClient] | None = None  # the image box's engine for a display's picture
    curtain_out: Callable[[str, str], None] | None = None  # a refused picture's display shows the curtain


def ui_of(request: Request) -> UI:
    ui: UI = request.app.state.ui
    return ui


pages_router = APIRouter(include_in_schema=False)
api_router = APIRouter(include_in_schema=False, dependencies=[Depends(require_api_key)])


def _static(name: str) -> bytes:
    return resources.files("bridge_http").joinpath("static", name).read_bytes()


def _assets() -> set[str]:
    folder = resources.files("bridge_http").joinpath("static")
    return {entry.name for entry in folder.iterdir() if entry.name.endswith(tuple(ASSET_TYPES))}


ASSETS = _assets()


def page(name: str) -> Response:
    return Response(_static(name), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


def display_name(name: str) -> str:
    if not DISPLAY_NAME.match(name):
        raise OpenAIError(404, "a display name is 1 to 64 letters, digits, '.', '_' or '-'",
                          type="not_found_error", param="name")
    return name


@pages_router.api_route("/", methods=["GET", "HEAD"])
async def console_page() -> Response:
    return page("console.html")


@pages_router.api_route("/display/{name}", methods=["GET", "HEAD"])
async def display_page(name: str) -> Response:
    display_name(name)
    return page("display.html")


@pages_router.api_route("/ui/{asset}", methods=["GET", "HEAD"])
async def asset(asset: str) -> Response:
    if asset not in ASSETS:
        raise OpenAIError(404, f"no asset {asset!r}", type="not_found_error")
    suffix = asset[asset.rindex("."):]
    return Response(_static(asset), media_type=ASSET_TYPES[suffix], headers=PAGE_HEADERS)


@pages_router.get("/display/{name}/image/{token}")
async def display_image(name: str, token: str, request: Request) -> Response:
    picture = ui_of(request).displays.picture(display_name(name), token)
    if picture is None:
        raise OpenAIError(404, "no such picture: a newer one replaced it", type="not_found_error")
    return Response(picture.data, media_type=picture.content_type,
                    headers={"Cache-Control": "private, max-age=3600, immutable",
                             "X-Content-Type-Options": "nosniff"})


@pages_router.get("/console/auth")
async def console_auth(request: Request) -> dict[str, bool]:
    """Whether a key is needed, and whether the one sent is right: how a page knows to ask for it
    without a refused request (a 401 would be logged as an error in the browser's console)."""
    bridge: Bridge = request.app.state.bridge
    if bridge.settings.api_key is None:
        return {"required": False, "accepted": True}
    try:
        await require_api_key(request)
    except OpenAIError:
        return {"required": True, "accepted": False}
    return {"required": True, "accepted": True}


# the streams ------------------------------------------------------------------------------------
@api_router.get("/console/events")
async def console_events(request: Request) -> StreamingResponse:
    live = ui_of(request).live
    subscriber = live.subscribe()
    return StreamingResponse(live.fanout.stream(subscriber), media_type="text/event-stream",
                             headers=STREAM_HEADERS)


@api_router.get("/display/{name}/events")
async def display_events(name: str, request: Request) -> StreamingResponse:
    fanout, subscriber = ui_of(request).displays.subscribe(display_name(name))
    return StreamingResponse(fanout.stream(subscriber), media_type="text/event-stream",
                             headers=STREAM_HEADERS)


# the controls -------------------------------------------------------------------------------------
PAUSED_FROM_CONSOLE = "paused from the console"


class PauseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(PAUSED_FROM_CONSOLE, min_length=1, max_length=200)


class ReloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, min_length=1, max_length=200)


class RestartBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    confirm: bool = Field(False, description="must be true: a restart resets the cards")


def engine_of(request: Request) -> EngineClient:
    bridge: Bridge = request.app.state.bridge
    return bridge.engine


@api_router.post("/console/pause")
async def console_pause(request: Request, body: PauseBody | None = None) -> dict[str, Any]:
    engine_of(request).pause(body.reason if body is not None else PAUSED_FROM_CONSOLE)  # a body is optional
    return {"ok": True, "state": engine_of(request).state().state}


@api_router.post("/console/resume")
async def console_resume(request: Request) -> dict[str, Any]:
    engine_of(request).resume()
    return {"ok": True, "state": engine_of(request).state().state}


@api_router.post("/console/reload")
async def console_reload(body: ReloadBody, request: Request) -> dict[str, Any]:
    engine = engine_of(request)
    await run_in_threadpool(engine.reload, body.model, 600.0)
    return {"ok": True, "state": engine.state().state}


@api_router.post("/console/restart")
async def console_restart(body: RestartBody, request: Request) -> dict[str, Any]:
    if not body.confirm:
        raise OpenAIError(400, "a restart resets every card and reloads the models: send "
                          '{"confirm": true} to do it', param="confirm", code="confirm_required")
    devices = await run_in_threadpool(engine_of(request).restart, "restart requested from the console")
    return {"ok": True, "devices": devices}


# the image prompt -----------------------------------------------------------------------------------
class ConsoleImage(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: str = Field(..., min_length=1, max_length=4000)
    negative_prompt: str = Field("", max_length=4000)
    model: str | None = Field(None, min_length=1, max_length=200)
    size: Annotated[str | None, Field(pattern=SIZE.pattern)] = None
    steps: int | None = Field(None, ge=1, le=8)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    display: Annotated[str | None, Field(pattern=DISPLAY_NAME.pattern)] = None
    preview: bool = False


@api_router.post("/console/image")
async def console_image(body: ConsoleImage, request: Request) -> StreamingResponse:
    bridge: Bridge = request.app.state.bridge
    ui = ui_of(request)
    match = SIZE.match(body.size or "")
    width, height = (int(match[1]), int(match[2])) if match else (None, None)
    jobs = image_jobs(1, body.seed, body.model, prompt=body.prompt, negative_prompt=body.negative_prompt,
                      width=width, height=height, steps=body.steps or DEFAULT_STEPS, format="png")
    # Its sender's turn in the queue, as every HTTP client's; step previews when asked for.
    jobs = [replace(job, sender=bridge.sender_of(request), preview=PREVIEW_PIXELS if body.preview else None)
            for job in jobs]
    engine = ui.engine_for(body.display) if ui.engine_for and body.display else ui.engine or bridge.engine
    group = JobGroup(engine)
    try:
        await group.submit(jobs)  # a refusal is an error answer before the stream starts
    except EngineError as exc:
        if exc.code is ErrorCode.REFUSED and body.display is not None and ui.curtain_out is not None:
            ui.curtain_out(body.display, jobs[0].request_id or "console")  # as an MQTT request's display
        raise

    async def stream() -> AsyncIterator[str]:
        try:
            async for item in group.events(idle_after=15.0):
                if item is None:
                    yield ": ping\n\n"
                    continue
                event = item[1]
                if isinstance(event, ImageProgress):
                    yield sse("progress", {"stage": event.stage, "step": event.step, "steps": event.steps})
                elif isinstance(event, ImagePreview):
                    yield sse("preview", {"src": data_url(event.data, event.content_type), "step": event.step,
                                          "steps": event.steps})
                    if body.display is not None:
                        show_preview(ui, body.display, event)
                elif isinstance(event, Done) and isinstance(event.result, ImageResult):
                    yield sse("done", finished(bridge, ui, body, event.result))
                elif isinstance(event, Failed):
                    yield sse("error", {"code": event.error.code.value, "message": event.error.message})
        finally:
            group.cancel()  # the page went away: the picture stops at its next step

    return StreamingResponse(stream(), media_type="text/event-stream", headers=STREAM_HEADERS)


def show_preview(ui: UI, display: str, preview: ImagePreview) -> None:
    if ui.preview_out is not None:
        ui.preview_out(display, preview)
    else:
        ui.displays.preview(display, preview.data, preview.content_type,
                            {"step": preview.step, "steps": preview.steps})


def data_url(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


def finished(bridge: Bridge, ui: UI, body: ConsoleImage, result: ImageResult) -> dict[str, Any]:
    out = result.output
    name = bridge.images.put(out.data, out.content_type)
    if body.display is not None:
        if ui.display_out is not None:
            ui.display_out(body.display, body.prompt, result)
        else:
            ui.displays.show(body.display, out.data, out.content_type)
    return {"src": f"/v1/images/files/{name}", "seed": out.seed, "steps": out.steps, "width": out.width,
            "height": out.height, "model": result.model, "ms": round(result.total_ms, 1),
            "display": body.display}
