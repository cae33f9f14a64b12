"""Tool calls: the chat template's own tool syntax (Qwen2.5's), the fallback for templates without
one (SmolLM2's), and reading calls back from an answer, whole and streamed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_prompt_tokens import QWEN25_TEMPLATE

from npu.llm.chat_template import ChatTemplate
from npu.llm.constraints import ConstraintError
from npu.llm.tools import RepeatGuard, ToolCallStream, parse_tool_calls, tool_constraint

ROOT = Path(__file__).resolve().parent.parent
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
LOOP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def smollm2() -> ChatTemplate:
    bundle = ROOT / "models" / "smollm2-135m-instruct"
    if not (bundle / "tokenizer_config.json").is_file():
        pytest.fail("the demo bundle is missing: ./scripts/test builds it first")
    return ChatTemplate.from_bundle(bundle)


def test_a_template_with_tool_syntax_renders_tools_and_calls_itself() -> None:
    template = ChatTemplate(QWEN25_TEMPLATE)
    assert template.knows_tools["default"]
    prompt = template.render(LOOP, tools=[WEATHER])
    assert json.dumps(WEATHER) in prompt, "the template listed the tool"
    assert CALL_TEXT in prompt, "the call's arguments are an object, not a string of JSON"
    assert '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>' in prompt


def test_a_template_without_tool_syntax_gets_the_same_form_in_plain_turns() -> None:
    template = smollm2()
    assert not template.knows_tools["default"]
    prompt = template.render(LOOP, tools=[WEATHER])
    assert prompt.startswith("<|im_start|>system\n# Tools\n") and json.dumps(WEATHER) in prompt
    assert f"<|im_start|>assistant\n{CALL_TEXT}<|im_end|>" in prompt, "the call as Qwen2.5 writes it"
    assert '<|im_start|>user\n<tool_response>\n{"sky": "sunny"}\n</tool_response><|im_end|>' in prompt
    assert "<|im_start|>tool" not in prompt
    # Without tools in the request, the earlier calls and results are still rendered.
    assert CALL_TEXT in template.render(LOOP)


def test_calls_are_read_back_whole_and_streamed_in_any_pieces() -> None:
    second = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo \\"N\\""}}\n</tool_call>'
    text = f"{CALL_TEXT}\n{second}"
    calls = parse_tool_calls(text)
    assert calls is not None and [json.loads(c.arguments)["city"] for c in calls] == ["Paris", 'Oslo "N"']
    assert parse_tool_calls("It is sunny.") is None
    for size in (1, 2, 3, 7, 40, len(text)):
        stream = ToolCallStream()
        deltas = []
        for start in range(0, len(text), size):
            out = stream.feed(text[start : start + size])
            assert not isinstance(out, str)
            deltas += out
        rest = stream.finish()
        assert not isinstance(rest, str)
        deltas += rest
        heads = [d for d in deltas if d.id is not None]
        assert [d.name for d in heads] == ["get_weather", "get_weather"] and heads[0].id != heads[1].id
        for index, call in enumerate(calls):
            args = "".join(d.arguments for d in deltas if d.index == index)
            assert json.loads(args) == json.loads(call.arguments), (size, args)


def test_an_answer_in_words_streams_as_content() -> None:
    stream = ToolCallStream()
    assert stream.feed("  ") == [] and stream.feed("It is") == "  It is" and stream.feed(" warm") == " warm"
    assert ToolCallStream().finish() == ""


def test_a_repeated_call_ends_the_answer_before_it() -> None:
    guard = RepeatGuard()
    sent, repeated = guard.feed(CALL_TEXT[:20])
    assert sent == CALL_TEXT[:20] and not repeated, "the first call streams as it comes"
    sent, repeated = guard.feed(CALL_TEXT[20:] + "\n" + CALL_TEXT[:30])
    assert sent == CALL_TEXT[20:] and not repeated, "a second call is held until it is whole"
    sent, repeated = guard.feed(CALL_TEXT[30:])
    assert sent == "" and repeated
    other = CALL_TEXT.replace("Paris", "Rome")
    guard = RepeatGuard()
    assert guard.feed(CALL_TEXT + "\n" + other) == (CALL_TEXT + "\n" + other, False)


def test_a_tool_whose_parameters_cannot_be_enforced_is_named() -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}
    with pytest.raises(ConstraintError) as caught:
        tool_constraint([WEATHER, bad], "auto", True)
    assert caught.value.field == "tools.1.function.parameters" and "not" in str(caught.value)
    with pytest.raises(ConstraintError) as caught:
        tool_constraint([{"type": "function", "function": {"name": "g", "parameters": {"type": 5}}}],
                        "required", False)
    assert caught.value.field == "tools.0.function.parameters"


def test_a_later_call_cut_short_is_dropped_and_a_first_one_is_not() -> None:
    guard = RepeatGuard()
    other = CALL_TEXT.replace("Paris", "Rome")
    sent, _ = guard.feed(CALL_TEXT + "\n" + other[:25])
    assert sent == CALL_TEXT and guard.calls == 1
    assert guard.drop_cut_call(), "the cut second call is dropped: the first is the answer"
    first = RepeatGuard()
    assert first.feed(CALL_TEXT[:25]) == (CALL_TEXT[:25], False)
    assert not first.drop_cut_call() and first.calls == 0, "a cut first call is not whole: no answer"
