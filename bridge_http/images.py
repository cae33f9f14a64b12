"""Images over HTTP: OpenAI's ``POST /v1/images/generations`` and AUTOMATIC1111's ``txt2img``.

Each picture is one engine job (``n`` of them for ``n`` pictures, seeds ``seed``, ``seed+1``...),
queued like chat and made step by step between other jobs' steps. Sizes and step counts the model
cannot make are refused before anything runs, with the ones it can.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from bridge_http import shapes
from bridge_http.auth import require_api_key
from bridge_http.bridge import Bridge
from bridge_http.errors import OpenAIError
from bridge_http.image_schemas import ImageGenerationRequest, Txt2ImgRequest
from bridge_http.jobs import JobGroup
from bridge_http.streaming import collect
from npu.diffusion.params import DEFAULT_STEPS, ImageParams
from npu.engine.api import ImageRequest, ImageResult

router = APIRouter(dependencies=[Depends(require_api_key)])
files_router = APIRouter()  # the token in the URL is the key
HTTP_MAX_BYTES = 64 * 1024 * 1024  # no broker in the way: only a sanity limit
SEED_SPACE = 2**32


async def run_images(bridge: Bridge, request: Request, jobs: list[ImageRequest]) -> list[ImageResult]:
    sender = bridge.sender_of(request)
    jobs = [dataclasses.replace(job, sender=sender) for job in jobs]
    group = JobGroup(bridge.engine)
    await group.submit(jobs)
    return await collect(group, request, len(jobs))


def image_jobs(count: int, seed: int | None, model: str | None, **fields: Any) -> list[ImageRequest]:
    first = seed if seed is not None else secrets.randbits(31)
    return [
        ImageRequest(ImageParams(seed=(first + i) % SEED_SPACE, max_bytes=HTTP_MAX_BYTES, **fields),
                     model=model, request_id=f"img-{secrets.token_hex(6)}")
        for i in range(count)
    ]


@router.post("/v1/images/generations")
async def handle_image_generations(body: ImageGenerationRequest, request: Request) -> Response:
    bridge: Bridge = request.app.state.bridge
    if body.n > bridge.settings.max_n:
        raise OpenAIError(400, f"n must be at most {bridge.settings.max_n} here (http.max_n)", param="n")
    width, height = body.dimensions()
    jobs = image_jobs(
        body.n, body.seed, body.model, prompt=body.prompt, negative_prompt=body.negative_prompt, width=width,
        height=height, steps=body.steps or DEFAULT_STEPS, guidance_scale=body.guidance_scale,
        format=body.output_format, quality=body.output_compression or 90,
    )
    results = await run_images(bridge, request, jobs)
    data = []
    for result in results:
        out = result.output
        item: dict[str, Any] = {"revised_prompt": body.prompt, "seed": out.seed}
        if body.response_format == "url":
            name = bridge.images.put(out.data, out.content_type)
            item["url"] = str(request.url_for("handle_image_file", name=name))
        else:
            item["b64_json"] = base64.b64encode(out.data).decode("ascii")
        data.append(item)
    first = results[0].output
    return JSONResponse({
        "created": shapes.now(), "data": data, "output_format": first.format,
        "size": f"{first.width}x{first.height}", "model": results[0].model,
    })


@files_router.get("/v1/images/files/{name}")
async def handle_image_file(name: str, request: Request) -> Response:
    bridge: Bridge = request.app.state.bridge
    stored = bridge.images.get(name)
    if stored is None:
        raise OpenAIError(404, "no such image: it expired (http image URLs last images.url_ttl seconds) "
                               "or never existed", type="not_found_error")
    return Response(stored.data, media_type=stored.content_type,
                    headers={"Cache-Control": "private, max-age=60"})


@router.post("/sdapi/v1/txt2img")
async def handle_txt2img(body: Txt2ImgRequest, request: Request) -> Response:
    bridge: Bridge = request.app.state.bridge
    count = body.batch_size * body.n_iter
    if count > bridge.settings.max_n:
        raise OpenAIError(400, f"batch_size x n_iter must be at most {bridge.settings.max_n} here "
                          "(http.max_n)", param="batch_size")
    jobs = image_jobs(
        count, None if body.seed == -1 else body.seed, None, prompt=body.prompt,
        negative_prompt=body.negative_prompt, width=body.width, height=body.height,
        steps=body.steps or DEFAULT_STEPS, format="png",
    )
    results = await run_images(bridge, request, jobs)
    first = results[0].output
    seeds = [r.output.seed for r in results]
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * count, "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * count, "seed": seeds[0], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * count, "width": first.width, "height": first.height,
        "sampler_name": "LCM", "steps": first.steps, "cfg_scale": 1.0, "batch_size": body.batch_size,
        "sd_model_name": results[0].model, "job_timestamp": shapes.now(),
    }
    return JSONResponse({
        "images": [base64.b64encode(r.output.data).decode("ascii") for r in results],
        "parameters": body.model_dump(), "info": json.dumps(info),
    })


@router.get("/sdapi/v1/sd-models")
async def handle_sd_models(request: Request) -> list[dict[str, Any]]:
    bridge: Bridge = request.app.state.bridge
    return [
        {"title": m.id, "model_name": m.id, "hash": None, "sha256": None, "filename": m.id, "config": None}
        for m in bridge.engine.models() if m.kind == "image"
    ]
