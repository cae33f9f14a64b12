"""``POST /v1/chat/completions`` and the legacy ``POST /v1/completions``: thin routes.

A request becomes one engine job per choice; refusals (bad input, a prompt over the context, an
unknown model, a full queue) are raised by the engine before anything is sent, so they arrive as
proper 4xx/5xx answers even when streaming was asked for.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from bridge_http import shapes
from bridge_http.auth import require_api_key
from bridge_http.bridge import Bridge
from bridge_http.jobs import JobGroup
from bridge_http.params import chat_requests, check_prompt_chars, completion_requests
from bridge_http.schemas import ChatCompletionRequest, CompletionRequest
from bridge_http.streaming import SSE_HEADERS, chat_format, collect, stream_sse, text_format
from bridge_http.structured import (
    add_text_logprobs,
    chat_response,
    structure_chat_stream,
    structure_text_stream,
    with_structure,
)
from npu.sentences import Chunker

router = APIRouter(dependencies=[Depends(require_api_key)])


@router.post("/v1/chat/completions")
async def handle_chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    bridge: Bridge = request.app.state.bridge
    cid, created = shapes.new_id("chatcmpl"), shapes.now()
    model = bridge.model_id(body.model)
    persona = bridge.persona_of(body.model, body.persona)
    context = bridge.context_length(persona.model or "" if persona is not None else model)
    jobs = chat_requests(body, cid, bridge.settings.max_n, context, sender=bridge.sender_of(request),
                         persona=persona)
    if persona is not None and not body.model:
        model = persona.name
    jobs = with_structure(body, jobs)  # response_format, tools, logit_bias, logprobs
    group = JobGroup(bridge.engine)
    await group.submit(jobs)
    if body.stream:
        fmt = chat_format(cid, created, model, len(jobs), body.include_usage)
        fmt = structure_chat_stream(fmt, body, cid, created, model)
        if body.chunk is not None and fmt.event_chunks is None:  # whole sentences for a speaker
            fmt.chunkers = {i: Chunker(body.chunk, body.width) for i in range(len(jobs))}
        return StreamingResponse(
            stream_sse(group, fmt, bridge.settings.ping_interval, bridge.settings.progress_ping_interval),
            media_type="text/event-stream", headers=SSE_HEADERS,
        )
    results = await collect(group, request, len(jobs))
    return JSONResponse(chat_response(cid, created, model, results, body))


@router.post("/v1/completions")
async def handle_completions(body: CompletionRequest, request: Request) -> Response:
    bridge: Bridge = request.app.state.bridge
    cid, created = shapes.new_id("cmpl"), shapes.now()
    model = bridge.model_id(body.model)
    for prompt in body.prompts():
        check_prompt_chars([prompt], bridge.context_length(model), "prompt")
    settings = bridge.settings
    jobs = completion_requests(body, cid, settings.max_n, settings.raw_prompt_special_tokens,
                               sender=bridge.sender_of(request))
    prompts = body.prompts()
    echoes = [p if body.echo else "" for p in prompts for _ in range(body.n)]
    jobs = with_structure(body, jobs)  # logit_bias, logprobs
    group = JobGroup(bridge.engine)
    await group.submit(jobs)
    if body.stream:
        fmt = text_format(cid, created, model, echoes, len(prompts), body.include_usage)
        fmt = structure_text_stream(fmt, body, cid, created, model)
        return StreamingResponse(
            stream_sse(group, fmt, bridge.settings.ping_interval, bridge.settings.progress_ping_interval),
            media_type="text/event-stream", headers=SSE_HEADERS,
        )
    results = await collect(group, request, len(jobs))
    response = shapes.text_completion(cid, created, model, results, echoes, len(prompts))
    return JSONResponse(add_text_logprobs(response, results, body, echoes))
