"""One message to many open pages: engine threads publish, each page's stream reads its own queue.

``publish`` may be called from any thread; it only hands the encoded message to each subscriber's
event loop (``call_soon_threadsafe``), so a slow browser never holds up the engine. A subscriber
that falls ``limit`` messages behind is dropped: its stream ends, the page reconnects and starts
again from a fresh snapshot, which is cheaper and truer than replaying what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

PING = ": ping\n\n"  # an SSE comment: keeps proxies and the browser's idle timers from closing the stream


def sse(event: str, data: Any) -> str:
    """One Server-Sent Event; the data is JSON on one line, so it never needs splitting."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"


class Subscriber:
    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.limit = limit
        self.dropped = False

    def offer(self, message: str) -> None:
        """On the subscriber's loop: queue the message, or end a stream that fell too far behind."""
        if self.dropped:
            return
        if self.queue.qsize() >= self.limit:
            self.dropped = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(message)


class Fanout:
    def __init__(self, limit: int = 500) -> None:
        self.limit = limit
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()
        self.closed = False

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self, first: list[str]) -> Subscriber:
        """A new subscriber on the running loop, with ``first`` (its snapshot) already queued.

        Subscribing and taking the snapshot must happen under the caller's own lock (see
        ``LiveFeed``) so that no message falls between the snapshot and the stream.
        """
        subscriber = Subscriber(asyncio.get_running_loop(), self.limit)
        for message in first:
            subscriber.queue.put_nowait(message)
        with self._lock:
            if self.closed:
                subscriber.queue.put_nowait(None)
            else:
                self._subscribers.add(subscriber)
        return subscriber

    def close(self) -> None:
        """End every stream cleanly (the appliance stops): a page sees the end, not a cut."""
        with self._lock:
            subscribers, self._subscribers = list(self._subscribers), set()
            self.closed = True
        for subscriber in subscribers:
            with contextlib.suppress(RuntimeError):
                subscriber.loop.call_soon_threadsafe(subscriber.queue.put_nowait, None)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(subscriber)

    def publish(self, message: str) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            with contextlib.suppress(RuntimeError):  # its loop is closed: the server is stopping
                subscriber.loop.call_soon_threadsafe(subscriber.offer, message)

    async def stream(self, subscriber: Subscriber, ping_every: float = 15.0) -> AsyncIterator[str]:
        """The subscriber's messages as SSE text, a ping after ``ping_every`` s of silence."""
        try:
            while True:
                try:
                    async with asyncio.timeout(ping_every):
                        message = await subscriber.queue.get()
                except TimeoutError:
                    yield PING
                    continue
                if message is None:
                    return
                yield message
        finally:
            self.unsubscribe(subscriber)
