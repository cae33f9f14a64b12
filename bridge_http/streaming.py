"""Engine events -> an SSE body, and -> whole results for answers that are not streamed.

Streams keep OpenAI's contract: each choice opens once (the role, or the echoed prompt), text
deltas follow, each choice ends with exactly one ``finish_reason``, the optional usage chunk comes
after every choice ended, and ``[DONE]`` is last. ``: ping`` comments keep proxies and clients
from timing out while a job waits in the queue or a long prompt is prefilled; while it waits, its
place goes out as a comment too, ``: queued position=2 eta_s=4.5 choice=0`` (clients ignore
comments; a kiosk page reads them). An error after the
200 went out is a chunk with an ``error`` object, which the ``openai`` client raises.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from bridge_http import shapes
from bridge_http.errors import OpenAIError
from bridge_http.jobs import IDLE, JobGroup, cancel_on_disconnect
from npu.engine.api import ChatResult, Delta, Done, Failed, Place, Progress
from npu.sentences import Chunker

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class StreamFormat:
    """How one endpoint spells its chunks; ``opening`` and ``delta`` return the chunk for a choice."""

    base: dict[str, Any]  # id, object, created, model: what the usage chunk repeats
    opening: Callable[[int], dict[str, Any] | None]
    delta: Callable[[int, str], dict[str, Any]]
    finish: Callable[[int, str], dict[str, Any]]
    prompts: int = 1
    choices: int = 1
    include_usage: bool = False
    results: dict[int, ChatResult] = field(default_factory=dict)
    # ``chunk``: each choice's text handed out in whole sentences or lines (npu/sentences.py).
    chunkers: dict[int, Chunker] | None = None
    # Structured output (bridge_http/structured.py): the chunks of one delta (tool calls,
    # logprobs) and of a choice's end, in place of ``delta`` and ``finish``.
    event_chunks: Callable[[int, Delta], list[dict[str, Any]]] | None = None
    closing: Callable[[int, ChatResult], list[dict[str, Any]]] | None = None


def chat_format(cid: str, created: int, model: str, choices: int, include_usage: bool) -> StreamFormat:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return shapes.chat_chunk(cid, created, model, index, delta, finish)

    return StreamFormat(
        base={"id": cid, "object": "chat.completion.chunk", "created": created, "model": model},
        opening=lambda i: chunk(i, {"role": "assistant", "content": ""}),
        delta=lambda i, text: chunk(i, {"content": text}),
        finish=lambda i, reason: chunk(i, {}, reason),
        choices=choices,
        include_usage=include_usage,
    )


def text_format(
    cid: str, created: int, model: str, echoes: list[str], prompts: int, include_usage: bool
) -> StreamFormat:
    def chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
        return shapes.text_chunk(cid, created, model, index, text, finish)

    return StreamFormat(
        base={"id": cid, "object": "text_completion", "created": created, "model": model},
        opening=lambda i: chunk(i, echoes[i]) if echoes[i] else None,
        delta=lambda i, text: chunk(i, text),
        finish=lambda i, reason: chunk(i, "", reason),
        prompts=prompts,
        choices=len(echoes),
        include_usage=include_usage,
    )


async def stream_sse(
    group: JobGroup, fmt: StreamFormat, ping_every: float, progress_ping_every: float
) -> AsyncIterator[bytes]:
    """The SSE body. Closing it (the client went away) cancels every job of the group."""
    try:
        for index in range(fmt.choices):
            opening = fmt.opening(index)
            if opening is not None:
                yield shapes.sse(opening)
        last_ping = time.monotonic()
        async for item in group.events(idle_after=ping_every):
            if item is IDLE:
                yield shapes.PING
                continue
            index, event = item
            if isinstance(event, Delta) and fmt.event_chunks is not None:
                for chunk in fmt.event_chunks(index, event):
                    yield shapes.sse(chunk)
            elif isinstance(event, Delta) and fmt.chunkers is not None:
                for unit in fmt.chunkers[index].feed(event.text):
                    yield shapes.sse(fmt.delta(index, unit))
            elif isinstance(event, Delta):
                yield shapes.sse(fmt.delta(index, event.text))
            elif isinstance(event, Progress):
                if time.monotonic() - last_ping >= progress_ping_every:
                    last_ping = time.monotonic()
                    yield shapes.PING
            elif isinstance(event, Place) and event.state == "queued":
                last_ping = time.monotonic()
                yield shapes.place_comment(index, event)
            elif isinstance(event, Done):
                result = event.result
                assert isinstance(result, ChatResult)  # a chat job's result
                fmt.results[index] = result
                for unit in fmt.chunkers[index].flush() if fmt.chunkers is not None else ():
                    yield shapes.sse(fmt.delta(index, unit))
                for chunk in (fmt.closing(index, result) if fmt.closing is not None
                              else [fmt.finish(index, result.finish_reason)]):
                    yield shapes.sse(chunk)
            elif isinstance(event, Failed):
                group.cancel()
                yield shapes.sse(OpenAIError.from_engine(event.error).body)
                yield shapes.DONE
                return
        if fmt.include_usage:
            ordered = [fmt.results[i] for i in range(fmt.choices)]
            yield shapes.sse(shapes.usage_chunk(fmt.base, ordered, fmt.prompts))
        yield shapes.DONE
    finally:
        group.cancel()  # a no-op for jobs that ended


async def collect(group: JobGroup, request: Request, choices: int) -> list[Any]:
    """Every job's result (``ChatResult`` or ``ImageResult``) in order; the first failure cancels the
    rest and becomes the answer."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, group))
    results: dict[int, Any] = {}
    try:
        async for item in group.events():
            if item is IDLE:
                continue
            index, event = item
            if isinstance(event, Failed):
                group.cancel()
                raise OpenAIError.from_engine(event.error)
            if isinstance(event, Done):
                results[index] = event.result
    finally:
        watcher.cancel()
        group.cancel()
    return [results[i] for i in range(choices)]
