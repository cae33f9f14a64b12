"""Bad input on the MQTT front door: every payload gets one reply in shape, naming what is wrong.

Driven through ``handlers.registry.dispatch`` with a fake engine that keeps what reached it, so
each test also shows which requests never got as far as the engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from front_door_fakes import CONTEXT, FakeEngine, Msg, Published
from tokenizers import Tokenizer

from appliance.config import MqttConfig
from appliance.topics import Topics
from handlers.context import HandlerContext, Limits
from handlers.registry import build_registry, dispatch
from npu.engine.api import ChatRequest, ImageRequest
from npu.llm.params import MAX_CHARS_PER_TOKEN, PARAM_BOUNDS, SEED_MAX, max_prompt_chars
from npu.llm.sampling import make_sampler

BASE = "appliance"
REGISTRY = build_registry()


def ask(payload: bytes | str | dict[str, Any], kind: str = "chat", max_payload: int = 65536,
        ) -> tuple[dict[str, Any], FakeEngine]:
    """Dispatch one request; its one final reply, and the engine it ran against."""
    engine, published = FakeEngine(), Published()
    ctx = HandlerContext(engine=engine, publish=published, topics=Topics(BASE),
                         limits=Limits(max_payload=max_payload))
    if isinstance(payload, dict):
        payload = json.dumps(payload)
    raw = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    dispatch(Msg(f"{BASE}/request/{kind}", raw), ctx, REGISTRY)
    replies = published.replies()
    assert len(replies) == 1, replies
    reply = replies[0]
    assert set(reply) == {"id", "status", "data", "error"}
    return reply, engine


def refusal(reply: dict[str, Any]) -> str:
    assert reply["status"] == "error" and reply["data"] == {}, reply
    assert reply["error"]["code"] == "bad_request", reply
    return str(reply["error"]["message"])


DIGITS = "9" * 5000


@pytest.mark.parametrize(
    ("raw", "request_id", "words"),
    [
        ('{"id": "a1", "prompt": "hi", "seed": ' + DIGITS + "}", "a1", ["seed", "5000 digits"]),
        ('{"id": "a2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -' + DIGITS + "}",
         "a2", ["max_tokens", "5000 digits"]),
        ('{"id": "a3", "prompt": "hi", "temperature": NaN}', "a3", ["temperature", "NaN"]),
        ('{"id": "a4", "prompt": "hi", "repetition_penalty": Infinity}', "a4", ["repetition_penalty"]),
        ('{"id": "a5", "prompt": "hi", "top_p": 1e999}', "a5", ["top_p", "out of range"]),
        ('{"id": "a6", "prompt": "\\ud800 lone"}', "a6", ["prompt", "UTF-8"]),
        ('{"id": "\\udfff", "prompt": "hi"}', None, ["id", "UTF-8"]),
        ('[{"id": "a8", "prompt": "hi"}]', None, ["array"]),
        ('{"id": "a9", "stop": ' + "[" * 5000 + "]" * 5000 + "}", None, ["nests too deeply"]),
        ('{"id": "a10", "prompt": "hi" "seed": 1}', None, ["not valid JSON", "line 1 column"]),
    ],
)
def test_payloads_the_json_reader_cannot_use_are_refused_by_field(
    raw: str, request_id: str | None, words: list[str]
) -> None:
    reply, engine = ask(raw)
    message = refusal(reply)
    assert all(w in message for w in words), message
    assert reply["id"] == request_id, "the id is echoed whenever it could be read"
    assert engine.submitted == []


def test_bytes_that_are_not_utf8_spoil_only_their_field() -> None:
    reply, _ = ask(b'{"id": "u1", "prompt": "caf\xe9"}')
    assert reply["id"] == "u1" and "prompt" in refusal(reply) and "UTF-8" in refusal(reply)
    reply, _ = ask(b"caf\xe9 au lait")  # plain text: no id to read
    assert reply["id"] is None and refusal(reply) == "payload is not valid UTF-8 (byte 3)"


def test_a_bare_number_and_bracketed_text_are_plain_text_prompts() -> None:
    for text in ("42", "[INST] Say hi [/INST]"):
        reply, engine = ask(text)
        assert reply["status"] == "ok"
        (request,) = engine.submitted
        assert isinstance(request, ChatRequest) and request.messages == [{"role": "user", "content": text}]


def test_seed_minus_one_draws_a_seed_and_other_seeds_out_of_range_name_the_range() -> None:
    reply, engine = ask({"id": "s1", "prompt": "hi", "seed": -1, "temperature": 0.8})
    assert reply["status"] == "ok", reply
    (request,) = engine.submitted
    assert isinstance(request, ChatRequest) and request.params.seed is None, "-1 means: draw one"
    assert make_sampler(request.params)(__import__("numpy").zeros(8, "float32")) in range(8)
    for seed in (-5, 2**70, SEED_MAX + 1):
        reply, engine = ask({"id": "s2", "prompt": "hi", "seed": seed})
        assert refusal(reply) == f"seed: must be -1 (random) or from 0 to {SEED_MAX}" and reply["id"] == "s2"
        assert engine.submitted == []
    reply, engine = ask({"id": "s3", "prompt": "hi", "seed": SEED_MAX})
    assert reply["status"] == "ok" and engine.submitted[0].params.seed == SEED_MAX


@pytest.mark.parametrize(
    ("field", "absurd"),
    [("repetition_penalty", 1e300), ("top_k", 10**12), ("max_tokens", 10**9), ("temperature", 1e308),
     ("top_p", 0.0), ("min_p", 1.0), ("presence_penalty", -1e9), ("frequency_penalty", 3.0),
     ("repetition_penalty", 0.0)],
)
def test_absurd_generation_controls_are_refused_naming_the_field(field: str, absurd: float) -> None:
    reply, engine = ask({"id": "g", "prompt": "hi", field: absurd})
    assert refusal(reply) == f"{field}: {PARAM_BOUNDS[field].must_be()}"
    assert engine.submitted == []


def test_each_range_admits_its_own_ends() -> None:
    for field, bound in PARAM_BOUNDS.items():
        ends = [bound.low, bound.high]
        for end, is_open in zip(ends, (bound.low_open, bound.high_open), strict=True):
            value = int(end) if field in ("max_tokens", "top_k", "seed") else float(end)
            reply, _ = ask({"id": "e", "prompt": "hi", field: value})
            assert (reply["status"] == "ok") != is_open, (field, value, reply)


def test_image_seed_minus_one_is_random_and_out_of_range_seeds_are_refused() -> None:
    reply, engine = ask({"id": "i1", "prompt": "a lighthouse", "seed": -1}, kind="image")
    assert reply["status"] == "ok", reply
    (request,) = engine.submitted
    assert isinstance(request, ImageRequest) and request.params.seed is None
    reply, engine = ask({"id": "i2", "prompt": "a lighthouse", "seed": 2**32}, kind="image")
    assert refusal(reply) == "seed: must be -1 (random) or from 0 to 4294967295" and engine.submitted == []


@pytest.mark.parametrize(
    ("kind", "payload", "message"),
    [
        ("chat", {"id": "t1", "prompt": "hi", "max_token": 5},
         'unknown field "max_token" (did you mean "max_tokens"?)'),
        ("chat", {"id": "t2", "promt": "hi"}, 'unknown field "promt" (did you mean "prompt"?)'),
        ("chat", {"id": "t3", "messages": [{"role": "user", "contnet": "hi"}]},
         'unknown field "messages.0.contnet" (did you mean "messages.0.content"?)'),
        ("image", {"id": "t4", "prompt": "x", "setps": 4}, 'unknown field "setps" (did you mean "steps"?)'),
        ("pause", {"id": "t5", "reasn": "hot"}, 'unknown field "reasn" (did you mean "reason"?)'),
        ("cancel", {"id": "t6", "colour": "red"}, 'unknown field "colour"'),
    ],
)
def test_unknown_fields_are_named_with_the_closest_known_one(kind: str, payload: dict[str, Any],
                                                             message: str) -> None:
    reply, engine = ask(payload, kind=kind)
    assert refusal(reply).startswith(message) and reply["id"] == payload["id"]
    assert engine.submitted == []


def test_the_fields_handlers_accept_are_still_accepted() -> None:
    chat = {"id": "k1", "reply_to": "replies/tester/r", "prompt": "hi", "model": "m", "max_tokens": 3,
            "temperature": 0.5, "top_p": 0.9, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
            "presence_penalty": 0.1, "frequency_penalty": 0.1, "stop": ["\n"], "seed": 7, "stream": True,
            "max_bytes": 100, "timeout_s": 30}
    image = {"id": "k2", "prompt": "x", "negative_prompt": "y", "model": "sd", "width": 64, "height": 64,
             "steps": 2, "seed": 1, "guidance_scale": 1.5, "display": "main", "format": "jpeg",
             "quality": 80, "stream": False, "timeout_s": 5}
    for kind, payload in (("chat", chat), ("image", image), ("cancel", {"id": "k1"}),
                          ("pause", {"id": 3, "reason": "x", "paused": False}), ("resume", {"id": 4}),
                          ("health_check", {"id": 5, "reply_to": "replies/tester/r"}),
                          ("restart", {"reason": "r"})):
        reply, _ = ask(payload, kind=kind)
        assert reply["status"] == "ok", (kind, reply)


def test_no_message_carries_a_pydantic_prefix() -> None:
    bad: list[tuple[str, Any]] = [
        ("chat", {"id": 1}), ("chat", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}),
        ("chat", {"promt": "x"}), ("chat", {"prompt": "x", "stop": [1]}), ("chat", {"prompt": 5}),
        ("image", {"prompt": "x", "format": "gif"}), ("image", {}), ("pause", {"paused": "yes"}),
        ("sim", {"fault": "melt"}), ("reload", {"model": 3}), ("cancel", {"id": True}),
    ]
    for kind, payload in bad:
        reply, _ = ask(payload, kind=kind)
        message = refusal(reply)
        assert "Value error" not in message and "Assertion failed" not in message, message
    assert refusal(ask({"id": 1}, kind="chat")[0]) == "give either messages or prompt (exactly one)"


def test_a_prompt_too_long_for_any_context_is_refused_before_the_engine_tokenizes_it() -> None:
    limit = max_prompt_chars(CONTEXT)
    reply, engine = ask({"id": "long", "prompt": "x" * (limit + 1)}, max_payload=4 * limit)
    assert reply["id"] == "long" and reply["error"]["code"] == "context_length_exceeded"
    assert str(limit + 1) in reply["error"]["message"] and engine.submitted == []
    reply, engine = ask({"id": "fits", "prompt": "x" * limit}, max_payload=4 * limit)
    assert reply["status"] == "ok" and len(engine.submitted) == 1


def test_the_character_bound_never_refuses_a_prompt_that_fits(demo_bundle_fp32: Path) -> None:
    """Each token is at most MAX_CHARS_PER_TOKEN characters, so more characters than that per token
    of context can never fit: the bound refuses only prompts the tokenizer would refuse."""
    tokenizer = Tokenizer.from_file(str(demo_bundle_fp32 / "tokenizer.json"))
    longest = max(len(tokenizer.decode([i])) for i in range(tokenizer.get_vocab_size()))
    assert longest <= MAX_CHARS_PER_TOKEN


def test_the_payload_limit_has_one_default() -> None:
    assert Limits().max_payload == MqttConfig().max_payload
