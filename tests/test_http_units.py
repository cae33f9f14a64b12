"""The bridge's pure parts: request parsing, engine requests, response shapes, error mapping."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bridge_http import shapes
from bridge_http.auth import exposure_warning
from bridge_http.errors import OpenAIError, validation_message
from bridge_http.params import LEGACY_MAX_TOKENS, chat_requests, completion_requests
from bridge_http.schemas import ChatCompletionRequest, CompletionRequest
from npu.engine.api import ChatResult, EngineError, ErrorCode
from npu.llm.params import Usage

HI = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HI, **fields})


def result(prompt: int, completion: int, cached: int = 0, text: str = "x") -> ChatResult:
    return ChatResult(text, "m", "stop", Usage(prompt, completion, cached), 1.0, 1.0, 2.0, 0.0)


def test_messages_become_template_turns() -> None:
    body = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "name": "bot"},
    ])
    (req,) = chat_requests(body, "id", max_n=4, context_length=100)
    assert req.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
    ]


def test_unknown_fields_are_ignored_and_unsupported_ones_refused() -> None:
    assert chat(user="u", metadata={"k": "v"}, store=False, parallel_tool_calls=True).messages
    assert chat(response_format={"type": "text"}, logprobs=False).messages
    assert chat(response_format={"type": "json_object"}, logprobs=True, top_logprobs=3).messages
    for bad in ({"tools": [{"type": "function"}]}, {"top_logprobs": 21},
                {"response_format": {"type": "json_schema"}}):
        with pytest.raises(ValidationError):
            chat(**bad)


def test_limits_seeds_and_defaults() -> None:
    (req,) = chat_requests(chat(max_tokens=50, max_completion_tokens=7), "id", 4, 2047)
    assert req.params.max_tokens == 7, "max_completion_tokens wins over max_tokens"
    (req,) = chat_requests(chat(), "id", 4, 2047)
    assert req.params.max_tokens == 2047, "no limit: up to the end of the context"
    assert req.params.temperature == 0.7, "left out: the engine's default"
    reqs = chat_requests(chat(n=3, seed=10, stop="END", top_k=5), "id", 4, 2047)
    assert [r.params.seed for r in reqs] == [10, 11, 12]
    assert all(r.params.stop == ("END",) and r.params.top_k == 5 and r.request_id == "id" for r in reqs)
    assert [r.params.seed for r in chat_requests(chat(n=2), "id", 4, 1)] == [None, None]
    with pytest.raises(OpenAIError) as err:
        chat_requests(chat(n=5), "id", 4, 2047)
    assert err.value.status == 400 and err.value.body["error"]["param"] == "n"


def test_legacy_prompts_fan_out_per_prompt_then_choice() -> None:
    body = CompletionRequest.model_validate({"prompt": ["a", "b"], "n": 2, "seed": 1})
    reqs = completion_requests(body, "id", max_n=4)
    assert [(r.prompt, r.params.seed) for r in reqs] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert all(r.params.max_tokens == LEGACY_MAX_TOKENS and r.messages is None for r in reqs)
    with pytest.raises(OpenAIError):
        completion_requests(CompletionRequest.model_validate({"prompt": ["a", "b", "c"], "n": 2}), "id", 4)
    for bad in ({"prompt": ""}, {"prompt": []}, {"prompt": [1, 2, 3]}, {"prompt": "a", "suffix": "z"}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)


def test_usage_counts_a_shared_prompt_once() -> None:
    two_choices = [result(10, 3, cached=4), result(10, 5, cached=4)]
    assert shapes.usage(two_choices) == {
        "prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    two_prompts = [result(10, 3), result(10, 3), result(6, 1), result(6, 1)]
    assert shapes.usage(two_prompts, prompts=2)["prompt_tokens"] == 16


def test_engine_errors_map_to_openai_statuses() -> None:
    cases = {
        ErrorCode.BAD_REQUEST: 400, ErrorCode.CONTEXT_LENGTH_EXCEEDED: 400, ErrorCode.MODEL_NOT_FOUND: 404,
        ErrorCode.BUSY: 503, ErrorCode.UNAVAILABLE: 503, ErrorCode.DEVICE_RESET: 503, ErrorCode.TIMEOUT: 504,
        ErrorCode.INTERNAL: 500,
    }
    for code, status in cases.items():
        err = OpenAIError.from_engine(EngineError(code, "why"))
        assert err.status == status and err.body["error"]["code"] == code.value
        assert err.body["error"]["message"] == "why"
        assert (err.retry_after is not None) == (status == 503), code
    busy = OpenAIError.from_engine(EngineError(ErrorCode.BUSY, "full", retry_after=2.2)).response()
    assert busy.headers["Retry-After"] == "3"
    long = EngineError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, "long",
                       details={"prompt_tokens": 3000, "max_prompt_tokens": 1920, "context_length": 2047})
    body = OpenAIError.from_engine(long).body["error"]
    assert body["n_prompt_tokens"] == 3000 and body["n_ctx"] == 2047 and body["param"] == "messages"


def test_validation_errors_read_as_one_line_naming_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        chat(temperature=5)
    message, param = validation_message([{**e, "loc": ("body", *e["loc"])} for e in err.value.errors()])
    assert param == "temperature" and message.startswith("temperature: ")


def test_exposure_warning_only_for_an_open_bridge_beyond_loopback() -> None:
    assert exposure_warning("0.0.0.0", None) and "http.api_key" in exposure_warning("0.0.0.0", None)  # type: ignore[operator]
    assert exposure_warning("192.168.1.20", None)
    assert exposure_warning("0.0.0.0", "key") is None
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
