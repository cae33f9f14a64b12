"""The pages' feeds without a browser: fan-out to many streams, a slow one dropped, the displays' board."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json

from PIL import Image

from bridge_http.displays import KEEP_IMAGES, DisplayBoard
from bridge_http.fanout import PING, Fanout, sse


def picture(colour: str, kind: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, kind)
    return out.getvalue()


def events(messages: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for message in messages:
        lines = dict(line.split(": ", 1) for line in message.strip().splitlines())
        parsed.append((lines["event"], json.loads(lines["data"])))
    return parsed


def test_every_stream_gets_its_snapshot_then_each_message_in_order() -> None:
    async def run() -> None:
        fanout = Fanout()
        first = fanout.subscribe([sse("hello", 1)])
        second = fanout.subscribe([sse("hello", 2)])
        for i in range(3):
            fanout.publish(sse("n", i))
        await asyncio.sleep(0)  # call_soon_threadsafe delivers on the next turn of the loop
        for subscriber, hello in ((first, 1), (second, 2)):
            got = [subscriber.queue.get_nowait() for _ in range(4)]
            assert events(got) == [("hello", hello), ("n", 0), ("n", 1), ("n", 2)]
        fanout.close()
        stream = fanout.stream(first, ping_every=0.05)
        assert [m async for m in stream] == [], "a closed feed ends every stream"
        assert len(fanout) == 0

    asyncio.run(run())


def test_a_stream_that_falls_behind_is_ended_and_the_others_go_on() -> None:
    async def run() -> None:
        fanout = Fanout(limit=5)
        slow = fanout.subscribe([])
        fast = fanout.subscribe([])
        for i in range(10):
            fanout.publish(sse("n", i))
            await asyncio.sleep(0)
            if not fast.queue.empty():
                fast.queue.get_nowait()
        assert slow.dropped and not fast.dropped
        got = [m async for m in fanout.stream(slow)]
        assert len(got) == 5, "what it had queued, then the end: the page reconnects for a fresh snapshot"
        assert slow not in fanout._subscribers
        pinged = fanout.stream(fast, ping_every=0.01)
        assert await pinged.__anext__() == PING, "a quiet stream is pinged"
        await pinged.aclose()

    asyncio.run(run())


def test_the_board_keeps_the_latest_pictures_behind_unguessable_tokens() -> None:
    async def run() -> None:
        board = DisplayBoard()
        assert not board.show("lobby", b"not a picture"), "only PNG, JPEG or WebP bytes are shown"
        red, blue = picture("red"), picture("blue", "JPEG")
        assert board.show("lobby", red)
        board.describe("lobby", {"prompt": "red", "sha256": hashlib.sha256(red).hexdigest()})
        _, page = board.subscribe("lobby")
        first = events([page.queue.get_nowait(), page.queue.get_nowait()])
        assert first[0][0] == "image" and first[1] == ("meta", {"prompt": "red",
                                                                "sha256": hashlib.sha256(red).hexdigest()})
        image = first[0][1]
        assert isinstance(image, dict) and image["content_type"] == "image/png"
        token = image["src"].rsplit("/", 1)[1]
        assert len(token) >= 24 and board.picture("lobby", token).data == red  # type: ignore[union-attr]
        assert board.picture("lobby", "guess") is None and board.picture("hall", token) is None
        assert board.show("lobby", blue, "image/jpeg")
        await asyncio.sleep(0)
        (name, data), = events([page.queue.get_nowait()])
        assert name == "image" and isinstance(data, dict) and data["content_type"] == "image/jpeg"
        for colour in ("green", "white", "black"):
            board.show("lobby", picture(colour))
        assert board.picture("lobby", token) is None, f"only the latest {KEEP_IMAGES} are kept"
        board.preview("lobby", blue, "image/jpeg", {"step": 1, "steps": 4})
        await asyncio.sleep(0)
        previews = [e for e in events([page.queue.get_nowait() for _ in range(page.queue.qsize())])
                    if e[0] == "preview"]
        assert previews and str(previews[0][1]["src"]).startswith("data:image/jpeg;base64,")  # type: ignore[index]

    asyncio.run(run())


def test_the_display_feed_sorts_the_display_topics_onto_the_board() -> None:
    from types import SimpleNamespace

    from appliance.display_feed import DisplayFeed
    from appliance.topics import Topics

    board = DisplayBoard()
    feed = DisplayFeed(SimpleNamespace(), Topics("gallery"), board)  # type: ignore[arg-type]
    red = picture("red")
    feed.handle("gallery/display/north", red)
    feed.handle("gallery/display/north/meta", b"{not json")
    feed.handle("gallery/display/north/meta", json.dumps({"prompt": "red"}).encode())
    feed.handle("gallery/display/south", b"")  # a cleared retained topic: nothing to show
    feed.handle("other/display/east", red)  # another base topic
    feed.handle("gallery/display/north/preview", picture("blue", "JPEG"))
    latest = board.latest("north")
    assert latest is not None and latest.data == red and latest.content_type == "image/png"
    assert board.latest("south") is None and board.latest("east") is None

    async def snapshot() -> list[tuple[str, object]]:
        _, page = board.subscribe("north")
        return events([page.queue.get_nowait(), page.queue.get_nowait()])

    got = asyncio.run(snapshot())
    assert [name for name, _ in got] == ["image", "meta"] and got[1][1] == {"prompt": "red"}
