"""Images served by URL (``response_format: url``): kept in memory, unguessable, expiring.

An art display or a browser fetches the picture once; the URL is the capability, as OpenAI's
signed image URLs are, so ``GET /v1/images/files/<token>`` needs no API key. Memory is bounded:
past ``max_items`` the oldest image goes first.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    content_type: str
    expires: float  # time.monotonic()


class ImageStore:
    def __init__(self, ttl: float = 3600.0, max_items: int = 64) -> None:
        self.ttl = ttl
        self.max_items = max_items
        self._items: OrderedDict[str, StoredImage] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes, content_type: str) -> str:
        """Keep an image; returns its file name (token and extension)."""
        ext = "jpg" if content_type == "image/jpeg" else "png"
        name = f"{secrets.token_urlsafe(24)}.{ext}"
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            self._items[name] = StoredImage(data, content_type, now + self.ttl)
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return name

    def get(self, name: str) -> StoredImage | None:
        with self._lock:
            self._expire(time.monotonic())
            return self._items.get(name)

    def _expire(self, now: float) -> None:
        for name in [n for n, item in self._items.items() if item.expires <= now]:
            del self._items[name]
