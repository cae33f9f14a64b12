"""What each display shows: its latest picture, its description and step previews, for the pages.

The appliance feeds the board from the broker (``appliance/display_feed.py`` subscribes to the
display topics, retained pictures included), so a page shows exactly what an MQTT display shows,
whoever published it, and the latest picture again after the appliance restarts. A picture is
served at an unguessable URL of its own (``/display/<name>/image/<token>``), which the page puts
in an ``<img>``; the token is the key, as for ``/v1/images/files``, so the API key never goes
into a URL. Previews are small and travel inside the event as ``data:`` URLs.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from bridge_http.fanout import Fanout, Subscriber, sse

MAX_DISPLAYS = 64  # names the board remembers; the oldest unwatched one is forgotten beyond this
KEEP_IMAGES = 3  # a page may still be loading the picture before the newest one
IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"RIFF": "image/webp"}


def sniff(data: bytes, declared: str | None) -> str | None:
    """The picture's type from its first bytes (an MQTT 3.1.1 message has no content type)."""
    for magic, kind in IMAGE_TYPES.items():
        if data.startswith(magic):
            return kind
    return declared if declared in IMAGE_TYPES.values() else None


@dataclass
class Picture:
    token: str
    data: bytes
    content_type: str
    at: float
    sha256: str


@dataclass
class Display:
    name: str
    pictures: list[Picture] = field(default_factory=list)
    meta: dict[str, Any] | None = None
    fanout: Fanout = field(default_factory=Fanout)
    touched: float = field(default_factory=time.monotonic)

    def image_event(self) -> dict[str, Any] | None:
        if not self.pictures:
            return None
        latest = self.pictures[-1]
        return {"src": f"/display/{self.name}/image/{latest.token}", "content_type": latest.content_type,
                "ts": round(latest.at, 3), "sha256": latest.sha256}


class DisplayBoard:
    def __init__(self) -> None:
        self._displays: dict[str, Display] = {}
        self._lock = threading.Lock()
        self.closed = False

    def _display_locked(self, name: str) -> Display:
        display = self._displays.get(name)
        if display is None:
            if len(self._displays) >= MAX_DISPLAYS:
                idle = [d for d in self._displays.values() if not len(d.fanout)]
                if idle:
                    del self._displays[min(idle, key=lambda d: d.touched).name]
            display = self._displays[name] = Display(name)
            if self.closed:
                display.fanout.close()
        display.touched = time.monotonic()
        return display

    def show(self, name: str, data: bytes, content_type: str | None = None) -> bool:
        """A new picture for ``name`` (any thread); False when the bytes are not a picture."""
        kind = sniff(data, content_type)
        if kind is None or not data:
            return False
        with self._lock:
            display = self._display_locked(name)
            picture = Picture(secrets.token_urlsafe(18), bytes(data), kind, time.time(),
                              hashlib.sha256(data).hexdigest())
            display.pictures = [*display.pictures[-(KEEP_IMAGES - 1):], picture]
            display.fanout.publish(sse("image", display.image_event()))
        return True

    def describe(self, name: str, meta: dict[str, Any]) -> None:
        """A picture's description (prompt, seed, size...); the page shows it as the caption of the
        picture whose ``sha256`` it names (the picture and its description arrive in either order)."""
        with self._lock:
            display = self._display_locked(name)
            display.meta = meta
            display.fanout.publish(sse("meta", meta))

    def preview(self, name: str, data: bytes, content_type: str | None = None,
                info: dict[str, Any] | None = None) -> None:
        """A step preview while a picture renders: sent to the pages, never kept."""
        kind = sniff(data, content_type)
        if kind is None:
            return
        src = f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"
        with self._lock:
            display = self._display_locked(name)
            display.fanout.publish(sse("preview", {**(info or {}), "src": src}))

    def close(self) -> None:
        """End every page's stream cleanly: the appliance stops."""
        with self._lock:
            self.closed = True
            fanouts = [d.fanout for d in self._displays.values()]
        for fanout in fanouts:
            fanout.close()

    def picture(self, name: str, token: str) -> Picture | None:
        with self._lock:
            display = self._displays.get(name)
            if display is None:
                return None
            for picture in display.pictures:
                if secrets.compare_digest(picture.token, token):
                    return picture
        return None

    def latest(self, name: str) -> Picture | None:
        with self._lock:
            display = self._displays.get(name)
            return display.pictures[-1] if display is not None and display.pictures else None

    def subscribe(self, name: str) -> tuple[Fanout, Subscriber]:
        """A page's stream of ``name``: the latest picture and its description first."""
        with self._lock:
            display = self._display_locked(name)
            first = []
            image = display.image_event()
            if image is not None:
                first.append(sse("image", image))
                if display.meta is not None:
                    first.append(sse("meta", display.meta))
            return display.fanout, display.fanout.subscribe(first)
