"""The handler layer without a broker: payloads, routing, UTF-8 cuts, the one-reply wrapper.

The engine here is a small scripted stand-in (``submit`` raises or emits events), because these
tests are about the wrapper's promises, not generation; end-to-end tests use the real engine.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.mqtt_link import encode_payload
from appliance.topics import Topics
from handlers.context import HandlerContext, Limits, default_text_bytes
from handlers.payloads import ChatPayload, PayloadError, decode_payload, validate_payload
from handlers.registry import Dispatcher, HandlerSpec, build_registry
from handlers.reply import cut_utf8, route_reply
from npu.engine.api import (
    ChatRequest,
    ChatResult,
    Delta,
    Done,
    EngineError,
    EngineState,
    ErrorCode,
    Failed,
    JobHandle,
    ModelInfo,
    Progress,
    Sink,
)
from npu.llm.params import Usage

BASE = "appliance"
TOPICS = Topics(BASE)


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation_data: bytes | None = None
    message_expiry: int | None = None
    received_at: float = field(default_factory=time.monotonic)
    qos: int = 1


class Recorder:
    """Stands in for ``MqttLink.publish``; JSON-encodes dicts like the link does."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, dict[str, Any] | None]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: Any, qos: int = 1, retain: bool = False,
                 properties: dict[str, Any] | None = None, on_delivered: Any = None) -> bool:
        assert "+" not in topic and "#" not in topic
        wire = encode_payload(payload)  # what the link would send: must always encode
        if isinstance(payload, dict):
            payload = json.loads(wire)
        elif isinstance(payload, bytes) and payload.startswith(b"{"):  # a reply, JSON on the wire
            payload = json.loads(payload)
        with self.lock:
            self.items.append((topic, payload, properties))
        return True

    def finals(self) -> list[tuple[str, dict[str, Any], dict[str, Any] | None]]:
        with self.lock:
            return [
                (t, p, props) for t, p, props in self.items
                if isinstance(p, dict) and "status" in p and "/stream/" not in t
            ]

    def on(self, topic: str) -> list[Any]:
        with self.lock:
            return [p for t, p, _ in self.items if t == topic]

    def wait_finals(self, n: int = 1, timeout: float = 3.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while len(self.finals()) < n and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.finals()


def result(text: str = "héllo wörld") -> ChatResult:
    return ChatResult(text, "stub", "stop", Usage(5, 3, 1), 1.0, 2.0, 12.34, 0.5)


class StubEngine:
    """Scripted engine: ``mode`` picks what ``submit`` does."""

    def __init__(self, mode: str = "thread_done") -> None:
        self.mode = mode
        self.submitted: list[ChatRequest] = []
        self.threads: list[threading.Thread] = []
        self.paused: str | None = None
        self.reloaded: list[str | None] = []

    def personas(self) -> list[Any]:
        return []

    def persona(self, name: str | None) -> Any:
        return None

    def submit(self, request: ChatRequest, sink: Sink) -> JobHandle:
        self.submitted.append(request)
        mode = self.mode
        if mode == "busy":
            raise EngineError(ErrorCode.BUSY, "the queue is full", retry_after=2.5)
        if mode == "model":
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, "no such model")
        if mode == "crash":
            raise RuntimeError("boom")
        handle = JobHandle(request, sink)
        events: list[Any] = [Progress(1, 2), Delta("hé", 1), Delta("llo wörld", 2)]
        events.append(Failed(EngineError(ErrorCode.TIMEOUT, "too slow")) if mode.endswith("failed") else
                      Done(result()))

        def run() -> None:
            for ev in events[:-1]:
                sink(ev)
            handle.finish(events[-1])

        if mode.startswith("sync"):
            run()
        else:
            t = threading.Thread(target=run)
            self.threads.append(t)
            t.start()
        return handle

    def join(self) -> None:
        for t in self.threads:
            t.join(2)

    def cancel(self, request_id: str) -> int:
        return sum(1 for r in self.submitted if r.request_id == request_id)

    def state(self) -> EngineState:
        return EngineState("paused" if self.paused else "idle", 0, 0, 4, self.paused)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("stub", "chat", True, "onnx", 2048, 1900)]

    def pause(self, reason: str = "paused") -> None:
        self.paused = reason

    def resume(self) -> None:
        self.paused = None

    def reload(self, model_id: str | None = None) -> None:
        if model_id == "nope":
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, "no model 'nope' here")
        self.reloaded.append(model_id)


def make(mode: str = "thread_done", max_payload: int = 4096) -> tuple[Dispatcher, StubEngine, Recorder]:
    engine, rec = StubEngine(mode), Recorder()
    ctx = HandlerContext(engine=engine, publish=rec, topics=TOPICS, limits=Limits(max_payload=max_payload))
    return Dispatcher(queue.Queue(), ctx), engine, rec


def ask(disp: Dispatcher, kind: str, payload: Any, **kw: Any) -> None:
    raw = payload if isinstance(payload, bytes) else (
        payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
    disp.handle(Msg(f"{BASE}/request/{kind}", raw, **kw))


# payloads ---------------------------------------------------------------------------------------
def test_plain_text_is_the_prompt() -> None:
    req = validate_payload(ChatPayload, decode_payload(b"Why is the sky blue?"), "prompt")
    assert isinstance(req, ChatPayload) and req.prompt == "Why is the sky blue?" and req.id is None


def test_unknown_fields_refused_by_name_and_ids_echoed() -> None:
    req = validate_payload(ChatPayload, {"id": 7, "prompt": "x", "stop": "\n"}, "prompt")
    assert isinstance(req, ChatPayload) and req.id == 7 and req.stop == "\n"
    with pytest.raises(PayloadError) as info:
        validate_payload(ChatPayload, {"id": 7, "prompt": "x", "colour": "red"}, "prompt")
    assert info.value.message == 'unknown field "colour"' and info.value.request_id == 7


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"prompt": "x", "temperature": "0.5"}, "temperature"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"messages": [{"role": "user"}]}, "messages.0.content"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
        ({}, "exactly one"),
    ],
)
def test_wrong_types_name_the_field(obj: dict[str, Any], field: str) -> None:
    with pytest.raises(PayloadError) as info:
        validate_payload(ChatPayload, obj, "prompt")
    assert field in info.value.message and info.value.code == "bad_request"


def test_broken_json_and_bad_utf8() -> None:
    for raw in (b'{"id": 1, "prompt": ', b"\xff\xfe"):
        with pytest.raises(PayloadError):
            decode_payload(raw)


# routing and cuts -------------------------------------------------------------------------------
def test_routing_order_and_refusals() -> None:
    r = route_reply(TOPICS, "chat", "replies/r5", b"cd", reply_to="replies/r3")
    assert (r.topic, r.correlation_data, r.refused) == ("replies/r5", b"cd", None)
    assert route_reply(TOPICS, "chat", None, None, "replies/r3").topic == "replies/r3"
    assert route_reply(TOPICS, "chat").topic == "appliance/response/chat"
    for bad in ("appliance/status", "homeassistant/x", "a/#", "$SYS/x", ""):
        r = route_reply(TOPICS, "chat", None, None, bad)
        assert r.topic == "appliance/response/chat" and r.refused
    assert route_reply(TOPICS, "chat", None, None, 42).refused


def test_refused_reply_topic_is_answered_on_default_topic() -> None:
    disp, engine, rec = make()
    ask(disp, "chat", {"id": "a", "prompt": "x", "reply_to": "appliance/display/x"})
    ask(disp, "chat", {"id": "b", "prompt": "x"}, response_topic="x/+", correlation_data=b"z")
    (t1, p1, _), (t2, p2, props2) = rec.finals()
    assert t1 == t2 == "appliance/response/chat"
    assert p1["error"]["code"] == "bad_request" and "appliance/display" in p1["error"]["message"]
    assert p2["id"] == "b" and "wildcard" in p2["error"]["message"] and props2 == {"correlation_data": b"z"}
    assert engine.submitted == []


@pytest.mark.parametrize(("text", "n", "want"), [("héllo", 2, "h"), ("héllo", 3, "hé"), ("🙂🙂", 7, "🙂"),
                                                 ("abc", 10, "abc"), ("é", 0, "")])
def test_cut_utf8(text: str, n: int, want: str) -> None:
    assert cut_utf8(text, n).decode("utf-8") == want


@given(st.text(), st.integers(0, 64))
def test_cut_utf8_is_longest_valid_prefix(text: str, n: int) -> None:
    out = cut_utf8(text, n)
    s = out.decode("utf-8")
    assert len(out) <= n or out == text.encode()
    assert text.startswith(s)
    if s != text:
        assert len(text[: len(s) + 1].encode()) > n


def test_default_text_bytes_fits_pubsubclient() -> None:
    topic = TOPICS.response_text("chat")
    n = default_text_bytes(topic)
    assert n == 256 - 8 - len(topic) == 220
    # fixed header 1 + remaining length 2 + topic length 2 + topic + packet id 2 + payload <= 256
    assert 1 + 2 + 2 + len(topic) + 2 + n <= 256


# chat -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["sync_done", "thread_done"])
def test_chat_stream_reply_and_text_copy(mode: str) -> None:
    disp, engine, rec = make(mode)
    ask(disp, "chat", {"id": "q1", "prompt": "hi", "stream": True, "max_bytes": 4, "seed": 3, "stop": "x"},
        response_topic="replies/r", correlation_data=b"c1")
    [(topic, body, props)] = rec.wait_finals()
    engine.join()
    assert topic == "replies/r" and props == {"correlation_data": b"c1"}
    assert body == {"id": "q1", "status": "ok", "error": None, "data": {
        "text": "héllo wörld", "model": "stub", "finish_reason": "stop", "ms": 12.3,
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "cached_tokens": 1}}}
    # A private reply's stream and text copy stay under its own topic, never the shared ones.
    stream = rec.on("replies/r/stream/q1")
    assert [m["seq"] for m in stream] == [0, 1, 2]
    assert "".join(m["delta"] for m in stream) == "héllo wörld"
    assert stream[-1] == {"id": "q1", "seq": 2, "delta": "", "done": True}
    assert rec.on("replies/r/text") == ["hél".encode()]  # 4 bytes -> 'hé' + 'l'
    assert not rec.on("appliance/stream/q1") and not rec.on("appliance/response/chat/text")
    req = engine.submitted[0]
    assert req.request_id == "q1" and req.messages == [{"role": "user", "content": "hi"}]
    assert req.params.seed == 3 and req.params.stop == ("x",)


def test_chat_plain_text_gets_an_id_and_default_cut() -> None:
    disp, _, rec = make("sync_done")
    ask(disp, "chat", "x" * 10)
    [(topic, body, _)] = rec.finals()
    assert topic == "appliance/response/chat" and body["id"].startswith("chat-")
    assert len(rec.on("appliance/response/chat/text")[0]) == len("héllo wörld".encode())


def test_chat_engine_errors() -> None:
    disp, _, rec = make("busy")
    ask(disp, "chat", {"id": 1, "prompt": "x"})
    [(_, body, _)] = rec.finals()
    assert body["id"] == 1 and body["data"] == {}
    assert body["error"] == {"code": "busy", "message": "the queue is full", "retry_after": 2.5}
    assert rec.on("appliance/response/chat/text") == [b"error: the queue is full"]

    disp, _, rec = make("thread_failed")
    ask(disp, "chat", {"id": "f", "prompt": "x", "stream": True})
    [(_, body, _)] = rec.wait_finals()
    assert body["error"]["code"] == "timeout"
    assert rec.on("appliance/stream/f")[-1]["done"] is True


def test_chat_bad_params_and_ids() -> None:
    disp, engine, rec = make()
    ask(disp, "chat", {"id": "p", "prompt": "x", "temperature": 5})
    ask(disp, "chat", {"id": "a/b", "prompt": "x"})
    ask(disp, "chat", {"id": 1.5, "prompt": "x"})
    bodies = [b for _, b, _ in rec.finals()]
    assert bodies[0]["id"] == "p" and "temperature" in bodies[0]["error"]["message"]
    assert bodies[1]["id"] == "a/b" and bodies[1]["error"]["code"] == "bad_request"
    assert bodies[2]["id"] is None and "id" in bodies[2]["error"]["message"]
    assert engine.submitted == []


def test_chat_deadline_from_expiry_and_timeout() -> None:
    disp, engine, rec = make("sync_done")
    now = time.monotonic()
    ask(disp, "chat", {"id": "d", "prompt": "x", "timeout_s": 30}, message_expiry=10, received_at=now)
    ask(disp, "chat", {"id": "e", "prompt": "x", "timeout_s": 5}, received_at=now)
    assert engine.submitted[0].deadline == pytest.approx(now + 10)
    assert engine.submitted[1].deadline == pytest.approx(now + 5)
    ask(disp, "chat", {"id": "old", "prompt": "x"}, message_expiry=1, received_at=now - 5)
    assert rec.finals()[-1][1]["error"]["code"] == "expired"


# wrapper ----------------------------------------------------------------------------------------
def test_wrapper_errors() -> None:
    disp, _, rec = make(max_payload=64)
    ask(disp, "chat", {"id": "big", "prompt": "x" * 100}, response_topic="replies/big")
    ask(disp, "frobnicate", {"id": 9})
    ask(disp, "chat", b'{"id": "broken"')
    finals = rec.finals()
    assert finals[0][0] == "replies/big" and finals[0][1]["error"]["code"] == "payload_too_large"
    assert finals[0][1]["id"] is None
    assert finals[1][0] == "appliance/response/frobnicate" and finals[1][1]["id"] == 9
    assert finals[1][1]["error"]["code"] == "unknown_op"
    assert finals[2][1] == {"id": None, "status": "error", "data": {}, "error": finals[2][1]["error"]}


def test_dispatcher_thread_survives_handler_exceptions() -> None:
    engine, rec = StubEngine(), Recorder()
    ctx = HandlerContext(engine=engine, publish=rec, topics=TOPICS)
    registry = build_registry()

    def explode(*_: Any) -> None:
        raise ZeroDivisionError

    registry["explode"] = HandlerSpec("explode", registry["resume"].payload, explode)
    q: queue.Queue[Any] = queue.Queue()
    disp = Dispatcher(q, ctx, registry)
    disp.start()
    q.put(Msg(f"{BASE}/request/explode", b'{"id": "x"}'))
    q.put(Msg(f"{BASE}/request/health_check", b'{"id": "h"}'))
    disp.stop()
    (_, b1, _), (t2, b2, _) = rec.finals()
    assert b1["error"]["code"] == "internal" and b1["id"] == "x"
    assert t2 == "appliance/response/health_check" and b2["status"] == "ok"
    assert b2["data"]["state"]["state"] == "idle" and b2["data"]["models"][0]["id"] == "stub"


def test_control_ops() -> None:
    disp, _, rec = make("sync_done")
    ask(disp, "chat", {"id": "c", "prompt": "x"})
    ask(disp, "cancel", "c")
    ask(disp, "pause", {"id": 1, "reason": "hot"})
    ask(disp, "resume", "")
    ask(disp, "cancel", {})
    ask(disp, "reload", {"id": "r", "model": "nope"})
    finals = rec.wait_finals(6)
    by_topic = {t: b for t, b, _ in finals[1:4]}
    assert by_topic["appliance/response/cancel"]["data"] == {"cancelled": 1}
    assert by_topic["appliance/response/pause"]["data"]["state"]["reason"] == "hot"
    assert by_topic["appliance/response/resume"]["data"]["state"]["state"] == "idle"
    assert finals[4][1]["error"]["code"] == "bad_request"
    assert finals[5][1]["id"] == "r" and finals[5][1]["error"]["code"] == "model_not_found"


# fuzz -------------------------------------------------------------------------------------------
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=False),
                        st.text(max_size=12))
json_value = st.recursive(json_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=5), c, max_size=3), max_leaves=6)
id_value = st.one_of(st.text(max_size=8), st.integers(-5, 10**6), json_value)
chat_fields = st.fixed_dictionaries({}, optional={
    "id": id_value, "prompt": st.text(max_size=20) | json_value,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                "content": st.text(max_size=8)}), max_size=2) | json_value,
    "temperature": st.floats(-1, 3) | json_value, "max_tokens": st.integers(-2, 50) | json_value,
    "top_p": st.floats(0, 1.5), "stream": st.booleans() | json_value, "stop": json_value,
    "reply_to": st.sampled_from(["replies/r", "appliance/request/x", "a/#", ""]) | json_value,
    "max_bytes": st.integers(-1, 40), "timeout_s": st.floats(-1, 100),
    "model": json_value, "seed": json_value,
})
payloads = st.one_of(
    st.binary(max_size=80),
    st.text(max_size=40).map(str.encode),
    chat_fields.map(lambda d: json.dumps(d).encode()),
    st.binary(min_size=300, max_size=320),
)


KINDS = ["chat", "chat", "chat", "cancel", "health_check", "pause", "resume", "reload", "nope"]
MODES = ["sync_done", "thread_done", "thread_failed", "sync_failed", "busy", "model", "crash"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    raw=payloads,
    mode=st.sampled_from(MODES),
    response_topic=st.sampled_from([None, None, "replies/rt", "appliance/status", "x/+"]),
    correlation=st.one_of(st.none(), st.binary(max_size=4)),
    expiry=st.one_of(st.none(), st.integers(0, 100)),
)
def test_fuzz_exactly_one_final_reply(kind: str, raw: bytes, mode: str, response_topic: str | None,
                                      correlation: bytes | None, expiry: int | None) -> None:
    disp, engine, rec = make(mode, max_payload=256)
    disp.handle(Msg(f"{BASE}/request/{kind}", raw, response_topic, correlation, expiry))
    rec.wait_finals(1)
    engine.join()
    time.sleep(0.005)
    finals = rec.finals()
    assert len(finals) == 1, finals
    body = finals[0][1]
    assert set(body) == {"id", "status", "data", "error"} and body["status"] in ("ok", "error")
    if body["status"] == "error":
        assert body["data"] == {} and {"code", "message"} <= set(body["error"])
    try:
        obj = json.loads(raw) if len(raw) <= 256 else None
    except ValueError:
        obj = None
    given_id = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(given_id, str | int) and not isinstance(given_id, bool):
        assert body["id"] == given_id  # a usable id is always echoed, even on errors
    elif kind == "chat" and body["status"] == "ok":
        assert str(body["id"]).startswith("chat-")  # plain text / no id: one is assigned
    else:
        assert body["id"] is None or kind == "chat"
