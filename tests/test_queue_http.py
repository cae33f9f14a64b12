"""The queue over HTTP: ``GET /v1/queue`` and a waiting stream's place as SSE comments, with the
official ``openai`` client still reading the stream as usual."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from bridge_http.app import create_app
from bridge_http.bridge import BridgeSettings
from bridge_http.server import HttpServer
from npu.engine.engine import Engine, EngineConfig
from npu.engine.worker import ModelSpec

MODEL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "Say hello."}]
PLACE = re.compile(r"^: queued position=(\d+) eta_s=(\d+(?:\.\d+)?|unknown) choice=0$")


@pytest.fixture(scope="module")
def base_url(demo_bundle_fp32: Path) -> Iterator[str]:
    engine = Engine([ModelSpec(MODEL, "chat", demo_bundle_fp32, runtime="onnx")],
                    config=EngineConfig(queue_max=4, max_active=1))
    engine.start(timeout=120)
    server = HttpServer(create_app(engine, BridgeSettings(api_key="k")), "127.0.0.1", 0)
    server.start()
    yield f"http://127.0.0.1:{server.bound_port}/v1"
    server.stop()
    engine.stop()


def until(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_waiting_stream_hears_its_place_and_the_queue_says_how_long(base_url: str) -> None:
    auth = {"Authorization": "Bearer k"}
    assert httpx.get(f"{base_url}/queue").status_code == 401, "the queue is behind the key like /v1/*"
    client = OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=60)
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=4)  # the figures are measured
    lines: list[str] = []
    texts: list[str] = []

    def stream(body: dict[str, object], into: list[str]) -> None:
        with httpx.stream("POST", f"{base_url}/chat/completions", json=body, headers=auth, timeout=60) as r:
            into.extend(line for line in r.iter_lines() if line)

    def sdk_stream() -> None:
        for chunk in client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, stream=True):
            texts.extend(c.delta.content or "" for c in chunk.choices)

    blocker = threading.Thread(target=stream, args=({"model": MODEL, "messages": HI, "max_tokens": 60,
                                                     "temperature": 0, "stream": True}, []))
    blocker.start()  # one slot: this one runs, the next two wait
    until(lambda: httpx.get(f"{base_url}/queue", headers=auth).json()["running"] == 1)
    waiting = threading.Thread(target=stream, args=({"model": MODEL, "messages": HI, "max_tokens": 4,
                                                     "stream": True}, lines))
    waiting.start()
    sdk = threading.Thread(target=sdk_stream)
    sdk.start()
    until(lambda: httpx.get(f"{base_url}/queue", headers=auth).json()["length"] == 2)
    queue = httpx.get(f"{base_url}/queue", headers=auth).json()
    assert queue["object"] == "queue" and queue["queue_max"] == 4 and queue["running"] == 1
    assert isinstance(queue["eta_s"], float) and queue["eta_s"] > 0, queue
    assert set(queue["figures"][MODEL]) == {"prefill", "decode"}
    for thread in (blocker, waiting, sdk):
        thread.join(60)
    places = [PLACE.match(line) for line in lines if line.startswith(": queued")]
    assert places and all(places), lines
    positions = [int(m.group(1)) for m in places if m]
    assert positions == sorted(positions, reverse=True) and positions[-1] == 1, "it counted down to next"
    first_text = next(i for i, line in enumerate(lines) if '"content":"' in line and '"role"' not in line)
    assert all(i < first_text for i, line in enumerate(lines) if line.startswith(": queued"))
    assert lines[-1] == "data: [DONE]"
    assert "".join(texts), "the openai client reads a stream with place comments as usual"
    assert httpx.get(f"{base_url}/queue", headers=auth).json()["length"] == 0


def test_chunk_sentence_streams_whole_sentences_that_join_to_the_answer(base_url: str) -> None:
    client = OpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=60)
    ask = {"model": MODEL, "max_tokens": 60, "temperature": 0, "seed": 3,
           "messages": [{"role": "user", "content": "Tell a short story about a lighthouse."}]}
    whole = client.chat.completions.create(**ask).choices[0].message.content  # type: ignore[call-overload]

    def streamed(**extra: object) -> list[str]:
        chunks = client.chat.completions.create(**ask, stream=True, extra_body=extra)  # type: ignore[call-overload]
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

    pieces = streamed(chunk="sentence")
    assert "".join(pieces) == whole
    assert len(pieces) >= 2 and all(p != p.rstrip() for p in pieces[:-1]), pieces
    lines = streamed(chunk="line", width=20)
    assert "".join(lines) == whole and all(len(line.rstrip()) <= 20 for line in lines), lines
