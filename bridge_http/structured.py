"""OpenAI structured output on the HTTP bridge: ``response_format``, ``tools``, ``logit_bias`` and
``logprobs``, turned into the sampler's constraint and back into OpenAI's response shapes.

The request side gives each ``ChatRequest`` its constraint (``npu.llm.constraints``; tools via
``npu.llm.tools``), its ``logit_bias`` pairs and its logprobs count; a bad schema, a tool without
a name or a ``tool_choice`` naming no tool is a 400 naming the field. The answer side writes
``message.tool_calls`` with ``finish_reason: "tool_calls"``, ``logprobs.content`` entries, and,
streamed, the deltas OpenAI sends (the call's id and name first, then pieces of ``arguments``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bridge_http import shapes
from bridge_http.errors import OpenAIError
from bridge_http.schemas import ChatCompletionRequest, CompletionRequest
from bridge_http.streaming import StreamFormat
from npu.engine.api import ChatRequest, ChatResult, Delta
from npu.llm.constraints import Constraint, ConstraintError, json_object, json_schema
from npu.llm.params import ParamError, TokenLogprob
from npu.llm.tools import ToolCallStream, ToolChoice, parse_tool_calls, tool_constraint


def _bad(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_value")


def tool_choice_of(body: ChatCompletionRequest) -> ToolChoice | None:
    """None when the request has no tools (or ``tool_choice`` is ``none`` and words are free)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise _bad(f"tool_choice {choice if isinstance(choice, str) else choice.function.name!r} "
                       "needs tools, and the request has none", "tool_choice")
        return None
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    names = [t.function.name for t in body.tools]
    if choice.function.name not in names:
        raise _bad(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                   f"({', '.join(names)})", "tool_choice")
    return choice.function.name


def constraint_for(body: ChatCompletionRequest) -> Constraint | None:
    """Tools (unless ``tool_choice`` is ``none``) win over ``response_format``."""
    choice = tool_choice_of(body)
    try:
        if choice is not None and choice != "none":
            tools = [t.model_dump(exclude_none=True) for t in body.tools or ()]
            return tool_constraint(tools, choice, body.parallel_tool_calls is not False)
        fmt = body.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json_object(field="response_format")
        assert fmt.json_schema is not None  # the schema model insists
        schema = fmt.json_schema.schema_ or {"type": "object"}
        return json_schema(schema, field="response_format.json_schema.schema",
                           strict=bool(fmt.json_schema.strict))
    except ConstraintError as exc:
        raise _bad(str(exc), exc.field) from exc


def tools_for_template(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    return [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None


def check_tool_messages(body: ChatCompletionRequest) -> None:
    """Every ``role: "tool"`` message answers a call of an earlier assistant message, as OpenAI insists.

    A result that answers no call would reach the model as a result of nothing; OpenAI refuses
    it with a 400, and so does the bridge, naming the message.
    """
    called: list[str] = []
    for i, message in enumerate(body.messages):
        if message.role == "assistant":
            called += [c.id for c in message.tool_calls or () if c.id is not None]
        if message.role != "tool":
            continue
        if not any(m.role == "assistant" and m.tool_calls for m in body.messages[:i]):
            raise _bad(f"messages.{i}: messages with role 'tool' must be a response to a preceding "
                       "message with 'tool_calls'", f"messages.{i}.role")
        if message.tool_call_id not in called:
            raise _bad(f"messages.{i}.tool_call_id {message.tool_call_id!r} answers no call of an earlier "
                       f"assistant message (their calls: {', '.join(called) or 'none with an id'})",
                       f"messages.{i}.tool_call_id")


def logit_bias_of(body: ChatCompletionRequest | CompletionRequest) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        if not key.strip().isdigit():
            raise _bad(f"logit_bias keys must be token ids (integers as strings), not {key!r}",
                       f"logit_bias.{key}")
        pairs.append((int(key), float(bias)))
    return tuple(pairs)


def logprobs_of(body: ChatCompletionRequest | CompletionRequest) -> int | None:
    if isinstance(body, CompletionRequest):
        return body.logprobs
    if body.top_logprobs is not None and not body.logprobs:
        raise _bad("top_logprobs needs logprobs: true", "top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


def with_structure(
    body: ChatCompletionRequest | CompletionRequest, jobs: Sequence[ChatRequest]
) -> list[ChatRequest]:
    """The jobs of one request with its constraint, tools, ``logit_bias`` and logprobs."""
    changes: dict[str, Any] = {"logit_bias": logit_bias_of(body), "logprobs": logprobs_of(body)}
    tools = None
    if isinstance(body, ChatCompletionRequest):
        check_tool_messages(body)
        changes["constraint"] = constraint_for(body)
        tools = tools_for_template(body)
    out = []
    for job in jobs:
        try:
            params = dataclasses.replace(job.params, **changes)
        except ParamError as exc:
            raise _bad(str(exc), exc.fields[0]) from exc
        out.append(dataclasses.replace(job, params=params, tools=tools))
    return out


# ------------------------------------------------------------------------------------------
# The answer side


def _entry(token: TokenLogprob) -> dict[str, Any]:
    return {
        "token": token.text, "logprob": token.logprob, "bytes": list(token.bytes),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for _, t, b, lp in token.top],
    }


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {"content": [_entry(t) for t in tokens], "refusal": None}


def text_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions shape: parallel lists and a dict of the top ones per token."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text: lp for _, text, _, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def chat_choice(index: int, result: ChatResult, tools: bool, logprobs: bool) -> dict[str, Any]:
    """One non-streamed choice: words, or ``tool_calls`` with ``finish_reason: "tool_calls"``.

    An answer of calls is never words: its whole calls are ``tool_calls`` (one ``max_tokens``
    cut short is left out), and with none whole the content is null with ``length``.
    """
    calls = parse_tool_calls(result.text) if tools else None
    message: dict[str, Any] = {"role": "assistant", "content": result.text, "refusal": None}
    finish: str = result.finish_reason
    if calls is not None:
        message["content"] = None
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ]
        finish = "tool_calls"
    return {"index": index, "message": message,
            "logprobs": chat_logprobs(result.logprobs) if logprobs else None, "finish_reason": finish}


@dataclass
class ChatStreamShaper:
    """Per choice: turns deltas into content or tool-call chunks, with logprobs when asked."""

    tools: bool
    logprobs: bool
    streams: dict[int, ToolCallStream] = field(default_factory=dict)

    def delta(self, index: int, event: Delta) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        """(delta, logprobs) pairs for one engine delta."""
        lp = chat_logprobs(event.logprobs) if self.logprobs and event.logprobs else None
        if not self.tools:
            return [({"content": event.text}, lp)]
        stream = self.streams.setdefault(index, ToolCallStream())
        calls = stream.feed(event.text)
        if isinstance(calls, str):
            return [({"content": calls}, lp)]
        out: list[tuple[dict[str, Any], dict[str, Any] | None]] = [
            ({"tool_calls": [self._call(c)]}, None) for c in calls
        ]
        if lp is not None:
            out = out or [({}, lp)]
            out[0] = (out[0][0], lp)
        return out

    def finish(self, index: int, result: ChatResult) -> tuple[list[dict[str, Any]], str]:
        """The last tool-call deltas of a choice and its finish_reason."""
        stream = self.streams.get(index)
        if not self.tools or stream is None:
            return [], result.finish_reason
        rest = stream.finish()
        if isinstance(rest, str):
            return ([{"content": rest}] if rest else []), result.finish_reason
        deltas = [{"tool_calls": [self._call(c)]} for c in rest]
        return deltas, "tool_calls" if result.complete and stream.calls else result.finish_reason

    @staticmethod
    def _call(delta: Any) -> dict[str, Any]:
        call: dict[str, Any] = {"index": delta.index}
        if delta.id is not None:
            call.update(id=delta.id, type="function", function={"name": delta.name, "arguments": ""})
        else:
            call["function"] = {"arguments": delta.arguments}
        return call


def wants_tools(body: ChatCompletionRequest) -> bool:
    return tool_choice_of(body) not in (None, "none")


def chat_response(cid: str, created: int, model: str, results: Sequence[ChatResult],
                  body: ChatCompletionRequest) -> dict[str, Any]:
    tools, logprobs = wants_tools(body), bool(body.logprobs)
    choices = [chat_choice(i, r, tools, logprobs) for i, r in enumerate(results)]
    return shapes.envelope("chat.completion", cid, created, model, choices, shapes.usage(results))


def add_text_logprobs(response: dict[str, Any], results: Sequence[ChatResult], body: CompletionRequest,
                      echoes: Sequence[str]) -> dict[str, Any]:
    if body.logprobs is not None:
        for choice, result, echo in zip(response["choices"], results, echoes, strict=True):
            choice["logprobs"] = text_logprobs(result.logprobs, len(echo))
    return response


def _with_logprobs(chunk: dict[str, Any], logprobs: dict[str, Any] | None) -> dict[str, Any]:
    if logprobs is not None:
        chunk["choices"][0]["logprobs"] = logprobs
    return chunk


def structure_chat_stream(fmt: StreamFormat, body: ChatCompletionRequest, cid: str, created: int,
                          model: str) -> StreamFormat:
    """Tool-call deltas and logprobs in a chat stream; plain streams are left as they are."""
    tools, logprobs = wants_tools(body), bool(body.logprobs)
    if not tools and not logprobs:
        return fmt
    shaper = ChatStreamShaper(tools, logprobs)

    def chunks(index: int, event: Delta) -> list[dict[str, Any]]:
        return [_with_logprobs(shapes.chat_chunk(cid, created, model, index, delta), lp)
                for delta, lp in shaper.delta(index, event)]

    def closing(index: int, result: ChatResult) -> list[dict[str, Any]]:
        deltas, finish = shaper.finish(index, result)
        out = [shapes.chat_chunk(cid, created, model, index, d) for d in deltas]
        return [*out, shapes.chat_chunk(cid, created, model, index, {}, finish)]

    fmt.event_chunks, fmt.closing = chunks, closing
    return fmt


def structure_text_stream(fmt: StreamFormat, body: CompletionRequest, cid: str, created: int,
                          model: str) -> StreamFormat:
    if body.logprobs is None:
        return fmt
    offsets: dict[int, int] = {}

    def chunks(index: int, event: Delta) -> list[dict[str, Any]]:
        at = offsets.get(index, 0)
        offsets[index] = at + len(event.text)
        chunk = shapes.text_chunk(cid, created, model, index, event.text)
        return [_with_logprobs(chunk, text_logprobs(event.logprobs, at))]

    fmt.event_chunks = chunks
    return fmt
