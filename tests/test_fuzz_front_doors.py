"""Fuzzing both front doors: every request is answered once, in its protocol's shape, and a long
run grows neither threads nor memory.

Hypothesis generates a few hundred requests per kind (MQTT: chat, image, cancel and the control
kinds; HTTP: chat and legacy completions, images), mixing valid fields, wrong types, values out of
range, unknown and misspelt fields, and raw edge cases (numbers of thousands of digits, NaN,
deep nesting, bytes that are not UTF-8, lone surrogates, arrays, oversize payloads). The run is
derandomized, so CI sees the same cases every time. Afterwards the same requests are sent again
under ``tracemalloc``: what stays allocated and how many threads run must not grow.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi.testclient import TestClient
from front_door_fakes import FakeEngine, Msg, Published
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.topics import Topics
from bridge_http.app import create_app
from bridge_http.bridge import BridgeSettings
from handlers.context import HandlerContext, Limits
from handlers.registry import build_registry, dispatch
from npu.validation import PYDANTIC_PREFIXES

BASE = "appliance"
MAX_PAYLOAD = 4096
MAX_BODY = 8192
PER_KIND = 250
MQTT_KINDS = ["chat", "image", "cancel", "health_check", "pause", "resume", "reload", "restart", "sim"]
HTTP_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/images/generations"]
GROWTH_LIMIT = 256 * 1024  # bytes still allocated after the replay, beyond what the first run left

# -- values ---------------------------------------------------------------------------------------
scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10))
anything = st.recursive(scalar, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)


def number(low: float, high: float) -> st.SearchStrategy[Any]:
    """Mostly near the range (inside and just outside it), sometimes anything at all."""
    return st.one_of(st.integers(int(low) - 2, int(high) + 2), st.floats(low - 1, high + 1), anything)


text = st.text(max_size=30)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard"]),
                                 "content": text | anything})
messages = st.lists(message, min_size=0, max_size=3) | anything
stops = st.none() | text | st.lists(text, max_size=3) | anything
seeds = st.integers(-3, 5) | st.integers(-(2**70), 2**70) | anything
SAMPLING = {
    "model": st.sampled_from(["m", "sd", "nope"]) | anything, "max_tokens": number(0, 200),
    "temperature": number(0, 2), "top_p": number(0, 1), "top_k": number(0, 10**13),
    "min_p": number(0, 1), "repetition_penalty": number(0, 12), "presence_penalty": number(-3, 3),
    "frequency_penalty": number(-3, 3), "stop": stops, "seed": seeds,
    "stream": st.booleans() | anything,
}
MQTT_FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "chat": {**SAMPLING, "prompt": text | anything, "messages": messages, "max_bytes": number(0, 300),
             "timeout_s": number(0, 100)},
    "image": {"prompt": text | anything, "negative_prompt": text, "model": SAMPLING["model"],
              "width": number(0, 5000), "height": number(0, 5000), "steps": number(0, 9), "seed": seeds,
              "guidance_scale": number(0, 5), "display": st.sampled_from(["main", "a/b", ""]) | anything,
              "format": st.sampled_from(["png", "jpeg", "gif"]) | anything, "quality": number(30, 101),
              "stream": st.booleans(), "timeout_s": number(0, 100)},
    "cancel": {}, "health_check": {}, "resume": {},
    "pause": {"reason": text | anything, "paused": st.booleans() | anything},
    "reload": {"model": SAMPLING["model"]}, "restart": {"reason": text | anything},
    "sim": {"device": number(-1, 3), "temperature_c": number(-60, 210), "cmm_used_mib": number(-1, 10),
            "npu_load_pct": number(-1, 101), "fault": st.sampled_from(["none", "hang", "melt"]) | anything},
}
COMMON = {"id": st.text(max_size=8) | st.integers(-5, 10**6) | anything,
          "reply_to": st.sampled_from(["replies/fuzz/r", f"{BASE}/status", "a/#", ""]) | anything}
TYPOS = st.sampled_from(["max_token", "promt", "temprature", "sed", "colour", "stream_options", "user"])

DIGITS = b"9" * 5000
RAW_EDGES = [
    b'{"id": "e1", "prompt": "hi", "seed": ' + DIGITS + b"}",
    b'{"id": "e2", "prompt": "hi", "temperature": NaN, "top_p": -Infinity}',
    b'{"id": "e3", "prompt": "hi", "stop": ' + b"[" * 1500 + b"]" * 1500 + b"}",
    b'{"id": "e4", "prompt": "caf\xe9"}', b"caf\xe9", b'{"id": "e5", "prompt": "\\ud800"}',
    b'{"id": "\\udc80", "prompt": "hi"}', b'{"\\ud800": 1, "id": "e6"}', b'[{"id": "e7"}]', b"42",
    b"[INST] hi",
    b"", b"   ", b"\xef\xbb\xbf{\"id\": \"e8\", \"prompt\": \"bom\"}", b'{"id": "e9", "prompt": "x" "y"}',
    b'{"id": "e10", "messages": [{"role": "user", "contnet": "hi"}]}', b"{" * 3000, b"x" * (MAX_PAYLOAD + 1),
    b'{"id": "e11", "prompt": "' + b"p" * MAX_PAYLOAD + b'"}',
]


def json_object(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    known = st.fixed_dictionaries({}, optional={**COMMON, **fields})
    extra = st.dictionaries(TYPOS | st.text(max_size=5), anything, max_size=2)
    return st.builds(lambda k, e, typo: {**k, **(e if typo else {})}, known, extra, st.booleans()).map(
        lambda obj: json.dumps(obj, allow_nan=True).encode())


def raw_payloads(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    return st.one_of(json_object(fields), json_object(fields), json_object(fields),
                     st.sampled_from(RAW_EDGES), st.binary(max_size=64), text.map(str.encode))


def readable_id(raw: bytes) -> str | int | None:
    """The request's id as a plain reading of the payload finds it (None: none could be read)."""
    if len(raw) > MAX_PAYLOAD:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return value


def check_message(message: Any) -> None:
    assert isinstance(message, str) and message, message
    assert not any(p in message for p in PYDANTIC_PREFIXES), message


@contextmanager
def quiet() -> Iterator[None]:
    """Errors are logged on purpose by the code under test; don't let the log capture grow."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def settle_threads(limit: int, timeout: float = 3.0) -> int:
    deadline = time.monotonic() + timeout
    while threading.active_count() > limit and time.monotonic() < deadline:
        time.sleep(0.01)
    return threading.active_count()


def replay_grows(send: Callable[[Any], None], cases: list[Any]) -> int:
    """Bytes still allocated after sending ``cases`` again, beyond what was allocated before."""
    with quiet():
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for case in cases:
                send(case)
            gc.collect()
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()


# -- MQTT -----------------------------------------------------------------------------------------
def mqtt_one(kind: str, raw: bytes, engine: FakeEngine, published: Published) -> dict[str, Any]:
    ctx = HandlerContext(engine=engine, publish=published, topics=Topics(BASE),
                         limits=Limits(max_payload=MAX_PAYLOAD))
    dispatch(Msg(f"{BASE}/request/{kind}", raw), ctx, REGISTRY)
    if kind == "reload":  # answered from its own thread
        deadline = time.monotonic() + 2
        while not published.replies() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.002)
    replies = published.replies()
    published.clear()
    assert len(replies) == 1, (kind, raw[:200], replies)
    return replies[0]


REGISTRY = build_registry()
mqtt_cases = st.one_of([st.tuples(st.just(kind), raw_payloads(MQTT_FIELDS[kind])) for kind in MQTT_KINDS])


def test_mqtt_every_request_gets_one_reply_in_shape() -> None:
    engine, published = FakeEngine(keep=False), Published()
    seen: list[tuple[str, bytes]] = []
    threads = threading.active_count()

    @settings(max_examples=PER_KIND * len(MQTT_KINDS), derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=mqtt_cases)
    def run(case: tuple[str, bytes]) -> None:
        kind, raw = case
        seen.append(case)
        reply = mqtt_one(kind, raw, engine, published)
        assert set(reply) == {"id", "status", "data", "error"}, reply
        if reply["status"] == "ok":
            assert reply["error"] is None and isinstance(reply["data"], dict)
        else:
            assert reply["status"] == "error" and reply["data"] == {}, reply
            check_message(reply["error"]["message"])
            assert isinstance(reply["error"]["code"], str)
        given_id = readable_id(raw)
        if given_id is not None:
            assert reply["id"] == given_id, (raw[:200], reply)
        if kind in ("chat", "image") and reply["status"] == "ok":
            assert reply["id"] is not None

    with quiet():
        run()
    assert len({kind for kind, _ in seen}) == len(MQTT_KINDS)
    assert settle_threads(threads) <= threads, "no thread outlives its request"
    growth = replay_grows(lambda case: mqtt_one(*case, engine, published), seen)
    assert growth < GROWTH_LIMIT, f"{growth} bytes more after replaying {len(seen)} requests"
    assert settle_threads(threads) <= threads


# -- HTTP -----------------------------------------------------------------------------------------
CHAT_FIELDS = {
    **SAMPLING, "messages": messages, "n": number(0, 5), "max_completion_tokens": number(0, 50),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}) | anything,
    "tools": st.none() | anything, "logprobs": st.none() | st.booleans(),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | anything,
    "user": text, "metadata": anything, "store": st.booleans(), "parallel_tool_calls": st.booleans(),
}
COMPLETION_FIELDS = {
    **SAMPLING, "prompt": text | st.lists(text, max_size=3) | anything, "n": number(0, 5),
    "echo": st.booleans(), "best_of": number(0, 3), "suffix": st.none() | text,
    "logprobs": st.none() | number(0, 2),
}
IMAGE_FIELDS = {
    "prompt": text | anything, "n": number(0, 5), "size": st.sampled_from(["64x64", "auto", "big"]),
    "response_format": st.sampled_from(["b64_json", "url", "png"]) | anything,
    "output_format": st.sampled_from(["png", "jpeg", "tiff"]), "output_compression": number(0, 100),
    "seed": seeds, "steps": number(0, 9), "negative_prompt": text, "guidance_scale": number(0, 5),
    "model": SAMPLING["model"],
}
HTTP_FIELDS = dict(zip(HTTP_ROUTES, (CHAT_FIELDS, COMPLETION_FIELDS, IMAGE_FIELDS), strict=True))
CONTENT_TYPES = st.sampled_from(["application/json"] * 6 + ["application/json; charset=utf-8", "text/plain",
                                                              "application/x-www-form-urlencoded", ""])


def http_body(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[bytes]:
    obj = st.builds(lambda known, extra: {**known, **extra}, st.fixed_dictionaries({}, optional=fields),
                    st.dictionaries(TYPOS, anything, max_size=1))
    encoded = obj.map(lambda o: json.dumps(o, allow_nan=True).encode())
    oversize = st.just(b'{"prompt": "' + b"x" * MAX_BODY + b'"}')
    return st.one_of(encoded, encoded, encoded, encoded, st.sampled_from(RAW_EDGES), oversize,
                     st.binary(max_size=64))


http_cases = st.one_of([st.tuples(st.just(route), http_body(HTTP_FIELDS[route]), CONTENT_TYPES)
                        for route in HTTP_ROUTES])


def http_one(client: TestClient, route: str, body: bytes, content_type: str) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post(route, content=body, headers=headers)
    if response.status_code != 200:
        error = response.json()["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
        check_message(error["message"])
        assert response.status_code in (400, 404, 413), (route, body[:200], response.status_code, error)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert data and data[-1] == "[DONE]", response.text[-300:]
        chunks = [json.loads(d) for d in data[:-1]]
        assert len({c["id"] for c in chunks if "id" in c}) == 1, "one id for the whole stream"
        return
    answer = response.json()
    if route == "/v1/images/generations":
        assert answer["data"] and all("b64_json" in d or "url" in d for d in answer["data"])
    else:
        assert answer["id"].startswith(("chatcmpl-", "cmpl-")) and answer["choices"], answer


def test_http_every_request_gets_one_answer_in_shape() -> None:
    engine = FakeEngine(keep=False)
    app = create_app(engine, BridgeSettings(max_body=MAX_BODY, max_n=3))  # type: ignore[arg-type]
    seen: list[tuple[str, bytes, str]] = []
    with TestClient(app, raise_server_exceptions=False) as client:

        @settings(max_examples=PER_KIND * len(HTTP_ROUTES), derandomize=True, database=None, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(case=http_cases)
        def run(case: tuple[str, bytes, str]) -> None:
            seen.append(case)
            http_one(client, *case)

        with quiet():
            run()
        assert {route for route, _, _ in seen} == set(HTTP_ROUTES)
        threads = threading.active_count()  # the client's portal and the pool's workers, warmed up
        growth = replay_grows(lambda case: http_one(client, *case), seen)
        assert growth < GROWTH_LIMIT, f"{growth} bytes more after replaying {len(seen)} requests"
        assert settle_threads(threads) <= threads, "the replay started no thread that stayed"
