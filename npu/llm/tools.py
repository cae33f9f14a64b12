"""Tool calls (OpenAI function calling) in the ``<tool_call>`` form Qwen2.5, Qwen3 and Hermes use.

A call is ``<tool_call>\\n{"name": "...", "arguments": {...}}\\n</tool_call>``, the form those
models were trained on; the grammar (:func:`tool_constraint`) holds the model to it, the name to
one of the request's tools and the arguments to that tool's ``parameters`` schema, so a call
always parses. Its objects are closed (no argument keys the schema does not declare) unless the
schema says ``additionalProperties``. A template that knows tools (it reads the ``tools``
variable) renders them itself; for one that does not (SmolLM2's), :func:`fallback_messages`
writes the same form into the conversation: the tools in a system turn worded as Qwen2.5's
template words it, earlier calls as ``<tool_call>`` blocks of the assistant's turn, and results
as user turns in ``<tool_response>``.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
from jinja2 import meta

from npu.llm.constraints import (
    JSON_STYLE,
    Constraint,
    check_schema,
    closed_objects,
    grammar,
    json_schema,
    lark_literal,
)

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ToolChoice = Literal["auto", "none", "required"] | str  # or the name of one function
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
_HEAD = re.compile(r'<tool_call>\s*\{"name":\s*"((?:[^"\\]|\\.)*)",\s*"arguments":\s*(?=\S)')
_TAIL = re.compile(r"\}\s*</tool_call>")
_TEXT = r'TEXT: /[^<][\s\S]*/'  # an answer in words: anything that does not open a call


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def function_of(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    function = tool.get("function")
    return function if isinstance(function, Mapping) else {}


def template_knows_tools(env: jinja2.Environment, source: str) -> bool:
    """The template reads ``tools`` (Qwen2.5, Qwen3, SmolLM3...), so it renders them itself."""
    return "tools" in meta.find_undeclared_variables(env.parse(source))


def tool_constraint(tools: Sequence[Mapping[str, Any]], choice: ToolChoice, parallel: bool) -> Constraint:
    """The answer's form for ``tool_choice``: ``auto`` words or calls, ``required`` (or a function's
    name) calls only, ``none`` words only. ``parallel`` allows several calls in one answer.

    Raises:
        ConstraintError: a ``parameters`` schema that cannot be enforced (names the tool).
    """
    if choice == "none":
        return grammar(f"start: TEXT\n{_TEXT}\n", kind="text", field="tool_choice")
    rules = []
    names = []
    for i, tool in enumerate(tools):
        function = function_of(tool)
        name = str(function.get("name"))
        if choice not in ("auto", "required") and name != choice:
            continue
        where = f"tools.{i}.function.parameters"
        schema = check_schema(function.get("parameters") or {"type": "object", "properties": {}}, where)
        schema = closed_objects(schema)  # no invented argument keys, strict or not
        json_schema(schema, field=where)  # an unenforceable keyword is named by its tool
        schema = {**schema, "x-guidance": JSON_STYLE}
        head = lark_literal(f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": ')
        rules.append(f"fn{i}: {head} args{i} \"}}\"\nargs{i}: %json {json.dumps(schema)}")
        names.append(f"fn{i}")
    call = f'call: {lark_literal(OPEN + chr(10))} ({" | ".join(names)}) {lark_literal(chr(10) + CLOSE)}'
    calls = 'calls: call ("\\n" call)*' if parallel else "calls: call"
    start = "start: calls | TEXT" if choice == "auto" else "start: calls"
    lines = [start, calls, call, *rules]
    if choice == "auto":
        lines.append(_TEXT)
    return grammar("\n".join(lines) + "\n", kind="tools", field="tools")


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls of an answer that opens with one, else None (an answer in words)."""
    if not text.lstrip().startswith(OPEN):
        return None
    calls = []
    for block in _CALL.findall(text):
        try:
            call = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", {})
            calls.append(ToolCall(new_call_id(), call["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


class RepeatGuard:
    """Ends an answer of calls at a call identical to an earlier one.

    Small models, once they have made a call, tend to make it again and again until
    ``max_tokens``; a repeated call adds nothing, so the answer ends before it. The first call
    streams as it comes; each later one is held until it is whole, then sent or, if it repeats
    one, dropped with everything after it. A later call that ``max_tokens`` cuts short is dropped
    too (:meth:`drop_cut_call`), so the answer is its whole calls.
    """

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._block = ""
        self._held = False

    def feed(self, text: str) -> tuple[str, bool]:
        """The text to send now, and whether the answer ends here (a repeat)."""
        out = []
        while text:
            end = (self._block + text).find(CLOSE)
            if end < 0:
                self._block += text
                if not self._held:
                    out.append(text)
                return "".join(out), False
            cut = end + len(CLOSE) - len(self._block)
            piece, text = text[:cut], text[cut:]
            block, self._block = self._block + piece, ""
            key = block.strip()
            if self._held and key in self._seen:
                return "".join(out), True
            self._seen.add(key)
            out.append(block if self._held else piece)
            self._held = True
        return "".join(out), False

    @property
    def calls(self) -> int:
        """Complete calls seen so far."""
        return len(self._seen)

    def drop_cut_call(self) -> bool:
        """At an end other than the grammar's (``max_tokens``): drop a later call cut short.

        The grammar lets the answer end only after a whole call, so a held block at the end is a
        call ``max_tokens`` cut; it is dropped and the whole calls before it are the answer.
        True when one was dropped.
        """
        dropped, self._block = bool(self._held and self._block), ""
        return dropped


@dataclass
class CallDelta:
    """A piece of a streamed call: the first of each call has ``id`` and ``name``."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


class ToolCallStream:
    """Streamed answer text -> OpenAI's tool-call deltas (name first, then pieces of arguments).

    While the start of the answer could still open a call, nothing is sent; once it is known to
    be words, ``feed`` returns the text to stream as content.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.is_calls: bool | None = None
        self.calls: list[ToolCall] = []
        self._pos = 0  # where the next call's opening is searched
        self._args_at: int | None = None  # where the current call's arguments start
        self._sent = 0  # arguments characters sent of the current call

    def feed(self, text: str) -> list[CallDelta] | str:
        """Call deltas, or (an answer in words) the text to send now as content."""
        if self.is_calls is False:
            return text
        self.buffer += text
        if self.is_calls is None:
            head = self.buffer.lstrip()
            if not head or (OPEN.startswith(head) and len(head) < len(OPEN)):
                return []
            self.is_calls = head.startswith(OPEN)
            if not self.is_calls:
                return self.buffer
        return self._deltas(final=False)

    def finish(self) -> list[CallDelta] | str:
        """The last call deltas, or words still held (an answer of blanks only)."""
        if self.is_calls is None:
            return self.buffer
        return self._deltas(final=True) if self.is_calls else []

    def _deltas(self, final: bool) -> list[CallDelta]:
        out: list[CallDelta] = []
        while True:
            if self._args_at is None:
                match = _HEAD.search(self.buffer, self._pos)
                if match is None:
                    return out
                name = json.loads(f'"{match.group(1)}"')
                self.calls.append(ToolCall(new_call_id(), name, ""))
                out.append(CallDelta(len(self.calls) - 1, "", self.calls[-1].id, name))
                self._args_at, self._sent = match.end(), 0
            start = self._args_at + self._sent
            tail = _TAIL.search(self.buffer, start)
            end = tail.start() if tail else (len(self.buffer) if final else len(self.buffer) - len(CLOSE) - 2)
            if end > start:
                out.append(CallDelta(len(self.calls) - 1, self.buffer[start:end]))
                self._sent += end - start
            if tail is None:
                return out
            call = self.calls[-1]
            args = self.buffer[self._args_at : tail.start()]
            self.calls[-1] = ToolCall(call.id, call.name, args)
            self._pos, self._args_at = tail.end(), None


def _arguments(value: Any) -> Any:
    """A call's arguments as an object where they are JSON text (templates write them with tojson)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _with_object_arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    function = function_of(call)
    return {**call, "function": {**function, "arguments": _arguments(function.get("arguments"))}}


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that knows tools: each call's arguments as an object."""
    out = []
    for message in messages:
        plain = dict(message)
        calls = plain.get("tool_calls")
        if isinstance(calls, list):
            plain["tool_calls"] = [_with_object_arguments(c) if isinstance(c, Mapping) else c for c in calls]
        out.append(plain)
    return out


def _call_block(call: Mapping[str, Any]) -> str:
    function = function_of(call)
    body = {"name": function.get("name"), "arguments": _arguments(function.get("arguments"))}
    return f"{OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{CLOSE}"


def tools_preamble(tools: Sequence[Mapping[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{listed}\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def fallback_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
) -> list[dict[str, Any]]:
    """The conversation in plain system/user/assistant turns for a template without tool syntax."""
    out: list[dict[str, Any]] = []
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role == "tool":
            text = f"<tool_response>\n{content or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and str(out[-1]["content"]).endswith("</tool_response>"):
                out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{text}"}
            else:
                out.append({"role": "user", "content": text})
            continue
        plain = {k: v for k, v in message.items() if k not in ("tool_calls", "tool_call_id")}
        calls = message.get("tool_calls")
        if role == "assistant" and isinstance(calls, list) and calls:
            blocks = "\n".join(_call_block(c) for c in calls if isinstance(c, Mapping))
            plain["content"] = f"{content}\n{blocks}" if content else blocks
        if plain.get("content") is None:
            plain["content"] = ""
        out.append(plain)
    if tools:
        preamble = tools_preamble(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}"}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out
