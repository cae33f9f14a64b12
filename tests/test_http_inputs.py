"""Bad input on the HTTP bridge: sizes before work, JSON errors a person reads, parameter ranges,
OpenAI's optional fields, the schema behind the key, llama.cpp's paths and CORS preflight.

The bridge runs over a fake engine (``front_door_fakes``) through FastAPI's TestClient, so each
test also shows which requests never reached the engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from front_door_fakes import CONTEXT, FakeEngine

from appliance.app import Appliance
from appliance.config import ConfigError, load_config
from bridge_http.app import create_app
from bridge_http.bridge import BridgeSettings
from bridge_http.server import HttpServer
from npu.engine.api import ChatRequest, ImageRequest
from npu.llm.params import PARAM_BOUNDS, SEED_MAX, max_prompt_chars
from npu.llm.sampling import make_sampler

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


def bridge(**settings: Any) -> tuple[TestClient, FakeEngine]:
    engine = FakeEngine()
    return TestClient(create_app(engine, BridgeSettings(**settings)), raise_server_exceptions=False), engine


@pytest.fixture
def open_bridge() -> Iterator[tuple[TestClient, FakeEngine]]:
    client, engine = bridge()
    with client:
        yield client, engine


def error_of(response: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return dict(body["error"])


def post_raw(client: TestClient, content: bytes, content_type: str | None = "application/json",
             path: str = CHAT) -> httpx.Response:
    headers = {} if content_type is None else {"Content-Type": content_type}
    return client.post(path, content=content, headers=headers)


# sizes: bytes, then characters, then tokens ------------------------------------------------------
def test_a_body_over_the_limit_is_a_413_before_it_is_read(open_bridge: tuple[TestClient, FakeEngine]) -> None:
    client, engine = open_bridge
    huge = json.dumps({"messages": [{"role": "user", "content": "word " * 2_000_000}]}).encode()
    assert len(huge) > 10_000_000
    error = error_of(post_raw(client, huge), 413)
    assert error["code"] == "request_too_large" and "1048576" in error["message"] and error["param"] is None
    chunked = error_of(client.post(CHAT, content=iter([huge[:600_000], huge[600_000:1_200_000]]),
                                   headers={"Content-Type": "application/json"}), 413)
    assert "more than 1048576 bytes" in chunked["message"], "no Content-Length: counted while reading"
    assert engine.submitted == []
    a1111 = client.post("/sdapi/v1/txt2img", content=huge, headers={"Content-Type": "application/json"})
    assert a1111.status_code == 413 and set(a1111.json()) == {"error", "detail", "body", "errors"}
    assert client.post(CHAT, json={"messages": HI}).status_code == 200, "the bridge keeps working"


def test_http_max_body_is_the_limit() -> None:
    client, engine = bridge(max_body=2048)
    with client:
        assert client.post(CHAT, json={"messages": HI, "stop": ["x" * 1500]}).status_code == 200
        error = error_of(client.post(CHAT, json={"messages": HI, "stop": ["x" * 2100]}), 413)
        assert "2048" in error["message"] and len(engine.submitted) == 1


def test_a_prompt_too_long_for_the_context_is_refused_before_it_is_tokenized(
    open_bridge: tuple[TestClient, FakeEngine],
) -> None:
    client, engine = open_bridge
    limit = max_prompt_chars(CONTEXT)
    over = [{"role": "system", "content": "s" * (limit // 2)},
            {"role": "user", "content": "u" * (limit // 2 + 1)}]
    error = error_of(client.post(CHAT, json={"messages": over}))
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert f"{limit + 1} characters" in error["message"]
    error = error_of(client.post("/v1/completions", json={"prompt": ["short", "p" * (limit + 1)]}))
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert engine.submitted == []
    assert client.post(CHAT, json={"messages": [{"role": "user", "content": "u" * limit}]}).status_code == 200


# JSON a person can read -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "content_type", "message", "param"),
    [
        (b'{"messages": [{"role": "user", "content": "hi"}] "n": 1}', "application/json",
         "the request body is not valid JSON: Expecting ',' delimiter at line 1 column 50", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain",
         "send the body as JSON with Content-Type: application/json (this one came as text/plain)", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', None,
         "send the body as JSON with Content-Type: application/json (this one came without a Content-Type)",
         None),
        (b"model=m&prompt=hi", "application/x-www-form-urlencoded",
         "send the body as JSON with Content-Type: application/json "
         "(this one came as application/x-www-form-urlencoded)", None),
        (b"[1, 2]", "application/json", "the request body must be a JSON object, not an array", None),
        (b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"7" * 5000 + b"}",
         "application/json", "seed: a number of 5000 digits is out of range", "seed"),
        (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "application/json",
         "temperature: NaN is not a JSON number; send a finite number", "temperature"),
        (b'{"messages": [{"role": "user", "content": "\\ud83d"}]}', "application/json",
         "messages.0.content: not valid UTF-8 text (a lone surrogate or a stray byte)", "messages.0.content"),
        (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "application/json; charset=utf-8",
         "messages.0.content: not valid UTF-8 text (a lone surrogate or a stray byte)", "messages.0.content"),
        (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json",
         "the request body cannot be read: the JSON nests too deeply (keep it to a few hundred levels)",
         None),
        (b"", "application/json",
         "the request has no body: send a JSON object with Content-Type: application/json", None),
    ],
)
def test_bodies_that_are_not_usable_json_get_a_sentence(
    open_bridge: tuple[TestClient, FakeEngine], content: bytes, content_type: str | None, message: str,
    param: str | None,
) -> None:
    client, engine = open_bridge
    error = error_of(post_raw(client, content, content_type))
    assert error["message"] == message and error["param"] == param
    assert error["type"] == "invalid_request_error" and engine.submitted == []
    assert client.post(CHAT, json={"messages": HI}).status_code == 200


def test_openai_optional_fields_are_accepted(open_bridge: tuple[TestClient, FakeEngine]) -> None:
    client, engine = open_bridge
    body = {"model": "m", "messages": HI, "user": "visitor-7", "n": 1, "stream": False,
            "stream_options": {"include_usage": True}, "logit_bias": {"50256": -100}, "metadata": {"k": "v"},
            "store": False, "service_tier": "auto", "parallel_tool_calls": False, "top_logprobs": None,
            "logprobs": False, "response_format": {"type": "text"}, "max_completion_tokens": 5,
            "frequency_penalty": 0.1, "presence_penalty": 0.1, "seed": 3, "prediction": None,
            "reasoning_effort": "low", "modalities": ["text"], "prompt_cache_key": "k",
            "safety_identifier": "x"}
    assert client.post(CHAT, json=body).status_code == 200
    legacy = {"model": "m", "prompt": "hi", "user": "u", "logit_bias": {}, "best_of": 1, "echo": False,
              "suffix": None, "stream_options": None}
    assert client.post("/v1/completions", json=legacy).status_code == 200
    assert len(engine.submitted) == 2


def test_no_message_carries_a_pydantic_prefix(open_bridge: tuple[TestClient, FakeEngine]) -> None:
    client, _ = open_bridge
    bodies: list[dict[str, Any]] = [
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": HI, "tools": [{"type": "function"}]},
        {"messages": HI, "top_logprobs": 21}, {"messages": HI, "response_format": {"type": "json_schema"}},
        {"messages": HI, "stop": ["ok", ""]}, {"messages": HI, "temperature": "hot"},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
    ]
    for body in bodies:
        message = error_of(client.post(CHAT, json=body))["message"]
        assert "Value error" not in message and "Assertion failed" not in message, message
    image = error_of(client.post("/v1/images/generations", json={"prompt": "x", "size": "big"}))
    assert image["message"] == "size: size must be WxH (e.g. 512x512) or auto, not 'big'"


# parameters -------------------------------------------------------------------------------------
def test_seed_minus_one_is_random_and_other_seeds_name_the_range(
    open_bridge: tuple[TestClient, FakeEngine],
) -> None:
    client, engine = open_bridge
    assert client.post(CHAT, json={"messages": HI, "seed": -1, "n": 2}).status_code == 200
    assert all(isinstance(r, ChatRequest) and r.params.seed is None for r in engine.submitted)
    make_sampler(engine.submitted[0].params)  # the engine can sample with it (it draws the seed)
    for seed in (-5, 2**70, SEED_MAX + 1):
        error = error_of(client.post(CHAT, json={"messages": HI, "seed": seed}))
        assert error["param"] == "seed"
        assert error["message"] == f"seed: must be -1 (random) or from 0 to {SEED_MAX}"
    engine.submitted.clear()
    assert client.post(CHAT, json={"messages": HI, "seed": SEED_MAX, "n": 2}).status_code == 200
    assert [r.params.seed for r in engine.submitted] == [SEED_MAX, 0], "choice seeds wrap inside the range"
    assert client.post("/v1/completions", json={"prompt": "hi", "seed": -1}).status_code == 200


@pytest.mark.parametrize(
    ("field", "absurd"),
    [("repetition_penalty", 1e308), ("top_k", 10**12), ("max_tokens", 10**9), ("max_completion_tokens", 0),
     ("temperature", 1e300), ("min_p", -0.5), ("presence_penalty", 50), ("top_p", 0)],
)
def test_absurd_generation_controls_are_refused_naming_the_field(
    open_bridge: tuple[TestClient, FakeEngine], field: str, absurd: float,
) -> None:
    client, engine = open_bridge
    for path, body in ((CHAT, {"messages": HI}), ("/v1/completions", {"prompt": "hi"})):
        if field == "max_completion_tokens" and path != CHAT:
            continue
        error = error_of(client.post(path, json={**body, field: absurd}))
        bound = PARAM_BOUNDS["max_tokens" if field == "max_completion_tokens" else field]
        assert error["param"] == field and error["message"] == f"{field}: {bound.must_be()}"
    assert engine.submitted == []


def test_image_seeds_minus_one_is_random(open_bridge: tuple[TestClient, FakeEngine]) -> None:
    client, engine = open_bridge
    assert client.post("/v1/images/generations", json={"prompt": "rain", "seed": -1}).status_code == 200
    (request,) = engine.submitted
    assert isinstance(request, ImageRequest) and 0 <= (request.params.seed or 0) < 2**32
    error = error_of(client.post("/v1/images/generations", json={"prompt": "rain", "seed": -5}))
    assert error["param"] == "seed" and "-1 (random) or from 0 to 4294967295" in error["message"]


# the schema, llama.cpp's paths --------------------------------------------------------------------
def test_the_openapi_schema_needs_the_key_and_the_docs_pages_are_off() -> None:
    client, _ = bridge(api_key=KEY)
    with client:
        assert error_of(client.get("/openapi.json"), 401)["code"] == "invalid_api_key"
        schema = client.get("/openapi.json", headers=AUTH)
        assert schema.status_code == 200 and CHAT in schema.json()["paths"]
        for page in ("/docs", "/redoc"):
            assert client.get(page).status_code == 404 and client.get(page, headers=AUTH).status_code == 404
    client, _ = bridge()
    with client:
        assert client.get("/openapi.json").status_code == 200, "an open bridge has an open schema"


def test_llama_cpp_paths_without_v1_use_the_same_handlers_and_key() -> None:
    client, engine = bridge(api_key=KEY)
    with client:
        for method, path, body in (("POST", "/chat/completions", {"messages": HI}),
                                   ("POST", "/completions", {"prompt": "hi"}), ("GET", "/models", None),
                                   ("GET", "/models/m", None)):
            assert error_of(client.request(method, path, json=body), 401)["code"] == "invalid_api_key"
            answer = client.request(method, path, json=body, headers=AUTH)
            assert answer.status_code == 200, (path, answer.text)
        assert client.get("/models", headers=AUTH).json()["data"][0]["id"] == "m"
        assert error_of(client.post("/chat/completions", json={"messages": HI, "seed": -5}, headers=AUTH))
        assert len(engine.submitted) == 2


# CORS ---------------------------------------------------------------------------------------------
ORIGIN = "http://gallery.local:8080"


def preflight(client: TestClient | httpx.Client, origin: str, path: str = CHAT) -> httpx.Response:
    return client.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                         "Access-Control-Request-Headers": "authorization,content-type"})


def test_cors_preflight_is_answered_for_listed_origins_only() -> None:
    client, _ = bridge(api_key=KEY, cors_origins=(ORIGIN,))
    with client:
        ok = preflight(client, ORIGIN)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        other = preflight(client, "http://elsewhere.example")
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        call = client.post(CHAT, json={"messages": HI}, headers={"Origin": ORIGIN, **AUTH})
        assert call.status_code == 200 and call.headers["access-control-allow-origin"] == ORIGIN
        refused = client.post(CHAT, json={"messages": HI}, headers={"Origin": ORIGIN})
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    client, _ = bridge()
    with client:
        off = preflight(client, ORIGIN)
        assert off.status_code == 405 and "access-control-allow-origin" not in off.headers


def test_cors_origins_from_the_config_reach_a_served_bridge(tmp_path: Path) -> None:
    config = tmp_path / "appliance.yaml"
    config.write_text(json.dumps({
        "http": {"host": "127.0.0.1", "port": 0, "cors_origins": [ORIGIN], "max_body": 4096},
        "homeassistant": {"enabled": False},
        "models": [{"id": "m", "path": str(tmp_path / "no-model")}],
    }))
    appliance = Appliance(load_config(config, env={}))
    if appliance.journal is not None:
        appliance.journal.close()  # never started: nothing else to stop
    assert appliance.http is not None
    settings = appliance.http.server.config.app.state.bridge.settings
    assert settings.cors_origins == (ORIGIN,) and settings.max_body == 4096
    assert load_config(None, env={}).http.cors_origins == [], "off by default"
    with pytest.raises(ConfigError, match="not an origin"):
        load_config(None, env={"APPLIANCE_HTTP_CORS_ORIGINS": '["http://gallery.local/app"]'})
    server = HttpServer(create_app(FakeEngine(), settings), "127.0.0.1", 0)  # type: ignore[arg-type]
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.bound_port}") as http:
            ok = preflight(http, ORIGIN)
            assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
            assert "access-control-allow-origin" not in preflight(http, "http://other:1").headers
    finally:
        server.stop()
