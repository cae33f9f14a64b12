"""Structured output that cannot break, against the demo model: JSON Schemas, JSON mode, choices,
tool calls, logit_bias and logprobs, through the real ``openai`` client and a real Mosquitto."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jsonschema import validate
from mqtt_client import Client, write_config
from pydantic import BaseModel, Field

from appliance.app import Appliance
from appliance.config import load_config
from npu.llm.constraints import json_schema
from npu.llm.params import GenerationParams
from npu.llm.runner import LLMRunner

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "on": {"type": "boolean"}}, "required": ["colour", "on"]},
    {"type": "object", "properties": {"level": {"type": "integer", "minimum": -100, "maximum": 100}},
     "required": ["level"]},
    {"type": "object", "properties": {"tags": {"type": "array", "minItems": 1, "maxItems": 3,
                                               "items": {"type": "string", "maxLength": 8}}},
     "required": ["tags"]},
    {"type": "object", "properties": {"light": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 16},
        "mode": {"enum": ["off", "dim", "full"]}}, "required": ["id", "mode"]}},
     "required": ["light"]},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"]}}}, "required": ["points"]},
    {"enum": ["yes", "no", "later"]},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                      "temp_c": {"type": "integer", "minimum": -40, "maximum": 50},
                                      "rain": {"type": "boolean"}},
     "required": ["city", "temp_c", "rain"]},
]
PROMPTS = ["Describe a person.", "Answer in JSON.", "Set up the lights for a gallery at night.",
           "What is the weather like?", "Pick something."]


def _closed(schema: Any) -> Any:
    """Every object of ``schema`` without extra properties (as OpenAI's strict mode requires)."""
    if isinstance(schema, dict):
        out = {k: _closed(v) for k, v in schema.items()}
        if out.get("type") == "object":
            out.setdefault("additionalProperties", False)
        return out
    return [_closed(v) for v in schema] if isinstance(schema, list) else schema


SCHEMAS = [_closed(s) for s in SCHEMAS]


@pytest.fixture(scope="module")
def runner(demo_bundle_fp32: Path) -> Iterator[LLMRunner]:
    loaded = LLMRunner.load(demo_bundle_fp32, backend="onnx")
    yield loaded
    loaded.close()


def test_200_schema_constrained_answers_all_validate(runner: LLMRunner) -> None:
    checked = 0
    for i, (schema, prompt) in enumerate(itertools.product(SCHEMAS, PROMPTS)):
        ids = runner.encode_chat([{"role": "user", "content": f"{prompt} Reply as JSON."}])
        constraint = json_schema(schema)
        for k in range(5):  # greedy once, then sampled with four seeds
            params = GenerationParams(max_tokens=64, temperature=0.0 if k == 0 else 0.8, seed=i * 5 + k,
                                      constraint=constraint)
            out = runner.generate(ids, params)
            assert out.finish_reason == "stop" and out.complete, (schema, out.text)
            validate(json.loads(out.text), schema)
            checked += 1
    assert checked == 200
    assert runner.grammars.misses == len(SCHEMAS), "each schema compiled once, then taken from the cache"


def test_an_answer_cut_by_max_tokens_says_it_is_incomplete(runner: LLMRunner) -> None:
    ids = runner.encode_chat([{"role": "user", "content": "Describe a person."}])
    params = GenerationParams(max_tokens=3, temperature=0, constraint=json_schema(SCHEMAS[0]))
    out = runner.generate(ids, params)
    assert out.finish_reason == "length" and out.complete is False


# --- the appliance: HTTP and MQTT -------------------------------------------------------------


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory, mqtt_broker, demo_bundle_fp32: Path):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("structured")
    base = "structured"
    path = write_config(tmp, mqtt_broker.port, base, demo_bundle_fp32,
                        http={"enabled": True, "host": "127.0.0.1", "port": 0})
    app = Appliance(load_config(path, env={}))
    app.start()
    try:
        for worker in app.engine.workers:
            assert worker.loaded.wait(120)
        assert app.link.subscribed.wait(10) and app.http is not None
        yield app, base, f"http://127.0.0.1:{app.http.bound_port}/v1"
    finally:
        app.stop()


@pytest.fixture
def client(appliance) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=appliance[2], api_key="none", max_retries=0)


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="demo", messages=[{"role": "user", "content": "Describe a person."}],
        response_format=Person, max_tokens=60, temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person) and 0 <= parsed.age <= 120
    json_mode = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": 'Reply with {"ok": true}'}], max_tokens=60,
        temperature=0, response_format={"type": "json_object"},
    )
    assert json_mode.choices[0].finish_reason == "stop", json_mode.choices[0].message.content
    assert isinstance(json.loads(json_mode.choices[0].message.content or ""), dict)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}


def test_the_openai_tool_calling_loop(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="demo", messages=messages, tools=[WEATHER],
                                           tool_choice="required", max_tokens=120, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    messages.append(choice.message)
    result = json.dumps({"sky": "sunny", "c": 21})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
    final = client.chat.completions.create(model="demo", messages=messages, tools=[WEATHER],
                                           tool_choice="none", max_tokens=30, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls

    # Streamed: the id and name first, then pieces of the arguments, as OpenAI streams them.
    names, args, finish = [], "", None
    for chunk in client.chat.completions.create(
        model="demo", messages=messages[:1], tools=[WEATHER], max_tokens=120, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ):
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            if tc.id:
                names.append(tc.function.name)
            args += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["get_weather"] and finish == "tool_calls"
    assert json.loads(args) == json.loads(call.function.arguments)


SET_LIGHT = {"type": "function", "function": {
    "name": "set_light", "description": "Switch a light",
    "parameters": {"type": "object", "properties": {"id": {"type": "integer"}, "on": {"type": "boolean"}},
                   "required": ["id", "on"]}}}


@pytest.mark.parametrize("parallel", [None, False])
def test_forced_tool_calls_are_tool_calls_even_when_max_tokens_cuts_a_repeat(  # type: ignore[no-untyped-def]
    appliance, parallel: bool | None
) -> None:
    """At 40 to 60 tokens the demo model, after its call, starts the same call again and is cut."""
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    named = {"type": "function", "function": {"name": "set_light"}}
    for max_tokens, choice in itertools.product((40, 50, 60), ("required", named)):
        body = {"model": "demo", "messages": [{"role": "user", "content": "Turn on light 3."}],
                "tools": [SET_LIGHT], "tool_choice": choice, "seed": 1, "max_tokens": max_tokens, **extra}
        r = httpx.post(f"{appliance[2]}/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()["choices"][0]
        assert out["finish_reason"] == "tool_calls" and out["message"]["content"] is None, (max_tokens, out)
        calls = out["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["set_light"], (max_tokens, calls)
        arguments = json.loads(calls[0]["function"]["arguments"])
        assert set(arguments) == {"id", "on"}, "no argument the schema does not declare"
    streamed: list[str] = []
    finish = None
    with httpx.stream("POST", f"{appliance[2]}/chat/completions", timeout=120, json={
        "model": "demo", "messages": [{"role": "user", "content": "Turn on light 3."}], "tools": [SET_LIGHT],
        "tool_choice": "required", "seed": 1, "max_tokens": 50, "stream": True, **extra}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice0 = json.loads(line[6:])["choices"][0]
                assert not choice0["delta"].get("content"), "no raw tool markup as content"
                calls = choice0["delta"].get("tool_calls", [])
                streamed += [c["function"]["name"] for c in calls if c.get("id")]
                finish = choice0["finish_reason"] or finish
    assert streamed == ["set_light"] and finish == "tool_calls"


def test_logprobs_and_logit_bias(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                         max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == out.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob >= entry.logprob  # greedy took the most likely
    text = "".join(e.token for e in content)
    ids_out = client.completions.create(model="demo", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert ids_out.choices[0].logprobs and len(ids_out.choices[0].logprobs.tokens or []) == 3
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0,
        logprobs=True, stream=True) if c.choices and c.choices[0].logprobs]
    assert "".join(e.token for lp in streamed for e in lp.content or []) == text
    legacy = [c.choices[0].logprobs for c in client.completions.create(
        model="demo", prompt="Hello", max_tokens=3, temperature=0, logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [t for lp in legacy for t in lp.tokens or []] == ids_out.choices[0].logprobs.tokens


def test_logit_bias_bans_a_token(appliance) -> None:  # type: ignore[no-untyped-def]
    url = appliance[2]
    body = {"model": "demo", "prompt": "One, two,", "max_tokens": 1, "temperature": 0, "logprobs": 0}
    first = httpx.post(f"{url}/completions", json=body, timeout=60).json()
    token_text = first["choices"][0]["logprobs"]["tokens"][0]
    assert first["choices"][0]["text"] == token_text
    forced = httpx.post(f"{url}/completions", json={**body, "logit_bias": {"28": 100}}, timeout=60).json()
    assert forced["choices"][0]["text"] == ","  # id 28 is "," in SmolLM2's vocabulary
    banned = httpx.post(f"{url}/completions", json={**body, "logit_bias": {"28": -100}}, timeout=60).json()
    assert banned["choices"][0]["text"] != ","


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"logit_bias": {"comma": 5}}, "logit_bias.comma"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias.99999999"),  # the model's vocabulary says so
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
     "tools.1.function.parameters"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    # A tool result must answer a call of an earlier assistant message, as OpenAI insists.
    ({"messages": [{"role": "user", "content": "Hi"},
                   {"role": "tool", "tool_call_id": "call_1", "content": "4"}]}, "messages.1.role"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
        {"role": "tool", "tool_call_id": "call_2", "content": "5"}]}, "messages.3.tool_call_id"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "4"}]}, "messages.2.tool_call_id"),
])
def test_bad_structured_input_is_a_400_naming_the_field(appliance, body: dict[str, Any], param: str) -> None:  # type: ignore[no-untyped-def]
    request = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **body}
    r = httpx.post(f"{appliance[2]}/chat/completions", json=request, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"], error


def test_mqtt_schema_format_and_choices(appliance, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    _, base, _ = appliance
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{base}/response/chat", f"{base}/response/chat/text")
        schema = SCHEMAS[7]
        requests = [
            {"id": "s1", "prompt": "The weather in Oslo?", "schema": schema, "max_tokens": 60,
             "temperature": 0},
            {"id": "c1", "prompt": "Is the gallery open?", "choices": ["yes", "no"], "temperature": 0.8},
            {"id": "j1", "prompt": "Any JSON.", "format": "json", "max_tokens": 3},
            {"id": "b1", "prompt": "x", "schema": {"type": "bogus"}},
            {"id": "b2", "prompt": "x", "choices": []},
        ]
        for r in requests:
            mqtt.publish(f"{base}/request/chat", r)
        mqtt.wait(lambda: len(mqtt.messages[f"{base}/response/chat"]) >= len(requests), timeout=120)
        replies = {m["id"]: m for m in mqtt.json(f"{base}/response/chat")}
        s1 = replies["s1"]["data"]
        validate(s1["json"], schema)
        assert json.loads(s1["text"]) == s1["json"]
        assert replies["c1"]["data"]["text"] in ("yes", "no") and "json" not in replies["c1"]["data"]
        j1 = replies["j1"]["data"]
        assert j1["finish_reason"] == "length" and j1["json"] is None and "max_tokens" in j1["incomplete"]
        for bad, field in (("b1", "schema"), ("b2", "choices")):
            assert replies[bad]["status"] == "error" and replies[bad]["error"]["message"].startswith(field)
        mqtt.wait(lambda: len(mqtt.messages[f"{base}/response/chat/text"]) >= len(requests))
        texts = [m.payload.decode() for m in mqtt.messages[f"{base}/response/chat/text"]]
        assert s1["text"] in texts, "the microcontroller copy is the plain text"
    finally:
        mqtt.close()
