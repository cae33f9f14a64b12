"""The JSON the bridge sends: whole responses, SSE chunks and usage. Pure functions over results.

Shapes follow what the ``openai`` client parses and what llama.cpp and vLLM send.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from npu.engine.api import ChatResult, Place

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"


def place_comment(index: int, place: Place) -> bytes:
    """A waiting job's place as an SSE comment: ``: queued position=2 eta_s=4.5 choice=0``."""
    eta = "unknown" if place.eta_s is None else f"{place.eta_s:g}"
    return f": {place.state} position={place.position} eta_s={eta} choice={index}\n\n".encode()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage(results: Sequence[ChatResult], prompts: int = 1) -> dict[str, Any]:
    """Prompt tokens count once per distinct prompt (``n`` choices share theirs), as OpenAI does."""
    n = max(1, len(results) // max(1, prompts))
    shared = results[::n]
    prompt = sum(r.usage.prompt_tokens for r in shared)
    completion = sum(r.usage.completion_tokens for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(r.usage.cached_tokens for r in shared)},
    }


def envelope(obj: str, cid: str, created: int, model: str, choices: list[dict[str, Any]],
             usage: dict[str, Any] | None) -> dict[str, Any]:
    """The fields every OpenAI response and chunk shares, in the order the clients print them."""
    return {
        "id": cid,
        "object": obj,
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage,
    }


def choice(index: int, finish_reason: str | None, **content: Any) -> dict[str, Any]:
    return {"index": index, **content, "logprobs": None, "finish_reason": finish_reason}


def chat_completion(cid: str, created: int, model: str, results: Sequence[ChatResult]) -> dict[str, Any]:
    choices = [choice(i, r.finish_reason, message={"role": "assistant", "content": r.text})
               for i, r in enumerate(results)]
    return envelope("chat.completion", cid, created, model, choices, usage(results))


def chat_chunk(
    cid: str, created: int, model: str, index: int, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    return envelope("chat.completion.chunk", cid, created, model, [choice(index, finish_reason, delta=delta)],
                    None)


def text_completion(
    cid: str, created: int, model: str, results: Sequence[ChatResult], prefixes: Sequence[str], prompts: int
) -> dict[str, Any]:
    """``prefixes[i]`` is the echoed prompt of choice ``i`` ("" without ``echo``)."""
    choices = [choice(i, r.finish_reason, text=prefixes[i] + r.text) for i, r in enumerate(results)]
    return envelope("text_completion", cid, created, model, choices, usage(results, prompts))


def text_chunk(
    cid: str, created: int, model: str, index: int, text: str, finish_reason: str | None = None
) -> dict[str, Any]:
    return envelope("text_completion", cid, created, model, [choice(index, finish_reason, text=text)], None)


def usage_chunk(base: dict[str, Any], results: Sequence[ChatResult], prompts: int = 1) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
    return {**base, "choices": [], "usage": usage(results, prompts)}
