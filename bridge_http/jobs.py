"""Engine jobs seen from asyncio: the ``n`` jobs of one HTTP request, their events on one queue.

The engine calls sinks on its worker thread; the sink only hands the event to the event loop
(``call_soon_threadsafe``), so a slow HTTP client never holds up the device. Cancelling the group
(client gone, or one choice failed) stops every job at its next step and frees its queue place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from functools import partial

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from npu.engine.api import Done, EngineClient, EngineError, Failed, JobEvent, JobHandle
from npu.engine.api import Request as JobRequest

IDLE = None  # yielded by ``events`` when nothing happened for ``idle_after`` seconds


class JobGroup:
    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, JobEvent]] = asyncio.Queue()
        self.handles: list[JobHandle] = []

    async def submit(self, requests: Sequence[JobRequest]) -> None:
        """Submit every job (tokenizing off the event loop), or none: a refusal cancels the rest."""
        try:
            for index, request in enumerate(requests):
                handle = await run_in_threadpool(self.engine.submit, request, partial(self._deliver, index))
                self.handles.append(handle)
        except (EngineError, asyncio.CancelledError):
            self.cancel()
            raise

    def _deliver(self, index: int, event: JobEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def events(self, idle_after: float | None = None) -> AsyncIterator[tuple[int, JobEvent] | None]:
        """Every job's events until each has ended; ``IDLE`` after ``idle_after`` s of silence."""
        remaining = len(self.handles)
        while remaining:
            try:
                async with asyncio.timeout(idle_after):
                    item = await self.queue.get()
            except TimeoutError:
                yield IDLE
                continue
            if isinstance(item[1], Done | Failed):
                remaining -= 1
            yield item


async def cancel_on_disconnect(request: Request, group: JobGroup) -> None:
    """Wait for the client to go away, then cancel its jobs (for answers that are not streamed)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            group.cancel()
            return
