"""OpenAI request bodies -> the engine's ``ChatRequest``s (one per choice). Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from bridge_http.errors import OpenAIError
from bridge_http.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from npu.engine.api import ChatRequest, Persona
from npu.llm.params import SEED_MAX, GenerationParams, ParamError, max_prompt_chars

_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty",
)
LEGACY_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def generation_params(body: SamplingFields, max_tokens: int, seed_offset: int = 0,
                      defaults: Mapping[str, Any] | None = None) -> GenerationParams:
    """Fields left out keep ``defaults`` (a persona's), then the engine's; choice ``i`` of ``n``
    samples with ``seed + i`` (wrapping inside the seed range)."""
    given: dict[str, Any] = {f: getattr(body, f) for f in _FIELDS if getattr(body, f) is not None}
    given = {**{k: v for k, v in (defaults or {}).items() if k in _FIELDS}, **given}
    first = body.seed if body.seed is not None else (defaults or {}).get("seed")
    seed = None if first is None else (first + seed_offset) % (SEED_MAX + 1)
    stop = body.stop_list() or tuple((defaults or {}).get("stop", ()))
    try:
        return GenerationParams(max_tokens=max_tokens, stop=stop, seed=seed, **given)
    except ParamError as exc:
        raise OpenAIError(400, str(exc), param=exc.fields[0], code="invalid_value") from exc
    except ValueError as exc:
        raise OpenAIError(400, str(exc), code="invalid_value") from exc


def check_prompt_chars(texts: Iterable[str], context_length: int | None, param: str) -> None:
    """Refuse a prompt too long to fit before it is tokenized (seconds for megabytes of text)."""
    if context_length is None:
        return
    chars, limit = sum(len(t) for t in texts), max_prompt_chars(context_length)
    if chars > limit:
        raise OpenAIError(
            400, f"the prompt is {chars} characters; a model with a context of {context_length} tokens "
            f"reads at most {limit}", param=param, code="context_length_exceeded",
        )


def check_n(body: SamplingFields, max_n: int, prompts: int = 1) -> None:
    if body.n > max_n:
        raise OpenAIError(
            400, f"n must be at most {max_n} on this appliance", param="n", code="invalid_value"
        )
    if body.n * prompts > max_n:
        raise OpenAIError(
            400, f"n times the number of prompts must be at most {max_n}", param="prompt",
            code="invalid_value",
        )


def chat_requests(
    body: ChatCompletionRequest, request_id: str, max_n: int, context_length: int | None,
    sender: str | None = None, persona: Persona | None = None,
) -> list[ChatRequest]:
    """Without a limit, a chat answer may run to the end of the context (OpenAI's behaviour).

    With a persona, its system prompt goes first, its defaults fill the fields left out, and it
    runs on its model unless the body names a model that is not the persona itself.
    """
    check_n(body, max_n)
    defaults = persona.defaults if persona is not None else {}
    limit = body.token_limit or defaults.get("max_tokens") or context_length or 4096
    messages = [m.for_template() for m in body.messages]
    model = body.model
    if persona is not None:
        messages = persona.messages(messages)
        model = persona.model if body.model in (None, "", persona.name) else body.model
    check_prompt_chars((m["content"] for m in messages), context_length, "messages")
    return [
        ChatRequest(
            model=model,
            messages=messages,
            params=generation_params(body, limit, i, defaults),
            enable_thinking=body.enable_thinking,
            request_id=request_id,
            sender=sender,
        )
        for i in range(body.n)
    ]


def completion_requests(
    body: CompletionRequest, request_id: str, max_n: int, parse_special_tokens: bool = False,
    sender: str | None = None,
) -> list[ChatRequest]:
    """Choices are ordered prompt by prompt, ``n`` for each (index = prompt * n + choice).

    A prompt is ordinary text unless ``parse_special_tokens`` (``http.raw_prompt_special_tokens``).
    """
    prompts = body.prompts()
    check_n(body, max_n, len(prompts))
    limit = body.token_limit or LEGACY_MAX_TOKENS
    return [
        ChatRequest(model=body.model, prompt=prompt, params=generation_params(body, limit, i),
                    request_id=request_id, parse_special_tokens=parse_special_tokens, sender=sender)
        for prompt in prompts
        for i in range(body.n)
    ]
