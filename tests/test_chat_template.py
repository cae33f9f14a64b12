"""ChatTemplate: SmolLM2's template from the GGUF, a Qwen3-style one, bundles, and transformers parity."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from npu.llm.chat_template import ChatTemplate, normalize_messages

# Qwen3's logic for thinking and reasoning, plus the helpers templates use (tojson,
# raise_exception, strftime_now, loop controls, the generation tag), in ChatML.
QWEN3_STYLE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" + tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and not loop.first %}
        {{- raise_exception('System message must be first, got one at position ' ~ loop.index0) }}
    {%- endif %}
    {%- if message.role == 'user' %}
        {{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {%- if loop.last and reasoning_content %}
            {{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content + '<|im_end|>\\n' }}
        {%- endgeneration %}
    {%- elif message.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}
    {%- endif %}
    {%- if message.content == 'STOP HERE' %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
{%- if show_date is defined and show_date %}{{ strftime_now('%Y') }}{% endif %}
"""

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief. Ünïcödé ✓ 你好"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ],
    [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Calling.", "reasoning_content": "need the tool"},
        {"role": "tool", "content": '{"temp": 21}'},
    ],
    [
        {"role": "user", "content": "STOP HERE"},
        {"role": "assistant", "content": "never rendered"},
    ],
]


@pytest.fixture(scope="module")
def smollm2_template(demo_gguf_path: Path) -> str:
    """The demo model's template, read from its GGUF (``demo_gguf_path`` fails if it is missing)."""
    from gguf_factory import demo_tokenizer_meta

    return str(demo_tokenizer_meta()["tokenizer.chat_template"])


def test_smollm2_template_from_gguf(smollm2_template: str) -> None:
    template = ChatTemplate(smollm2_template, bos_token="<|im_start|>", eos_token="<|im_end|>")
    prompt = template.render([{"role": "user", "content": "Hi there"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = template.render(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
        add_generation_prompt=False,
    )
    assert with_system == "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_qwen3_style_thinking_off_by_default() -> None:
    template = ChatTemplate(QWEN3_STYLE)
    messages = [{"role": "user", "content": "Hi"}]
    assert template.render(messages) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert template.render(messages, enable_thinking=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen3_style_history_drops_old_reasoning_and_keeps_the_last() -> None:
    template = ChatTemplate(QWEN3_STYLE)
    prompt = template.render(CONVERSATIONS[1], add_generation_prompt=False)
    assert "add" not in prompt and "<|im_start|>assistant\n4<|im_end|>" in prompt
    prompt = template.render(CONVERSATIONS[2][:2], add_generation_prompt=False)
    assert prompt.endswith("<|im_start|>assistant\n<think>\nneed the tool\n</think>\n\nCalling.<|im_end|>\n")


def test_reasoning_aliases_are_filled_like_transformers() -> None:
    [message] = normalize_messages([{"role": "assistant", "content": "x", "reasoning": "why"}])
    assert message["reasoning_content"] == message["thinking"] == "why"


def test_tools_use_tojson_without_ascii_escapes() -> None:
    tool = {"type": "function", "function": {"name": "météo", "description": "<b>&"}}
    prompt = ChatTemplate(QWEN3_STYLE).render([{"role": "user", "content": "Hi"}], tools=[tool])
    assert '{"type": "function", "function": {"name": "météo", "description": "<b>&"}}' in prompt


def test_tool_use_template_is_chosen_when_tools_are_given() -> None:
    template = ChatTemplate({"default": "plain", "tool_use": "with {{ tools | length }} tools"})
    assert template.render([]) == "plain"
    assert template.render([], tools=[{"name": "f"}]) == "with 1 tools"


def test_content_as_list_of_text_parts_is_flattened() -> None:
    template = ChatTemplate(QWEN3_STYLE)
    parts = [{"type": "text", "text": "Describe"}, {"type": "text", "text": "briefly."}]
    as_parts = template.render([{"role": "user", "content": parts}])
    assert as_parts == template.render([{"role": "user", "content": "Describe\nbriefly."}])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([{"type": "image_url", "image_url": {"url": "x"}}], "type 'image_url' is not supported"),
        ([{"type": "text"}], "'text' must be a string"),
        (["bare string"], "must be an object"),
        (42, "content must be a string or a list"),
    ],
)
def test_bad_content_parts_are_rejected(content: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ChatTemplate(QWEN3_STYLE).render([{"role": "user", "content": content}])


@pytest.mark.parametrize("role", ["developer", "function", None, "USER"])
def test_bad_role_is_rejected(role: Any) -> None:
    with pytest.raises(ValueError, match="message 1: role"):
        ChatTemplate(QWEN3_STYLE).render([{"role": "user", "content": "a"}, {"role": role, "content": "b"}])


def test_messages_must_be_a_list_of_objects() -> None:
    with pytest.raises(ValueError, match="list"):
        ChatTemplate("x").render("hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="message 0"):
        ChatTemplate("x").render(["hello"])  # type: ignore[list-item]


def test_raise_exception_becomes_value_error_with_the_template_message() -> None:
    messages = [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match=r"^System message must be first, got one at position 1$"):
        ChatTemplate(QWEN3_STYLE).render(messages)


def test_render_errors_inside_the_template_become_value_errors(smollm2_template: str) -> None:
    with pytest.raises(ValueError, match="cannot render"):
        ChatTemplate(smollm2_template).render([{"role": "assistant", "content": None}])


def test_syntax_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for %}")


def test_sandbox_blocks_python_internals() -> None:
    with pytest.raises(ValueError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(ValueError):
        ChatTemplate("{% set _ = messages.append(1) %}").render([])


def test_caller_messages_are_not_mutated() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}]}]
    ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}").render(messages)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "a"}]}]


def test_extra_variables_and_strftime_now() -> None:
    prompt = ChatTemplate(QWEN3_STYLE).render([{"role": "user", "content": "a"}], show_date=True)
    assert prompt.endswith(str(datetime.now().year))


def test_from_bundle_string_template_and_added_token_dicts(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
                "bos_token": {"content": "<s>", "special": True, "__type": "AddedToken"},
                "eos_token": "</s>",
            }
        ),
        encoding="utf-8",
    )
    template = ChatTemplate.from_bundle(tmp_path)
    assert template.render([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


def test_from_bundle_named_templates_pick_default(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "{{ bos_token }}default"},
                ]
            }
        ),
        encoding="utf-8",
    )
    assert ChatTemplate.from_bundle(tmp_path).render([]) == "default"  # no bos_token: renders empty


def test_from_bundle_jinja_file_takes_priority(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("file", encoding="utf-8")
    assert ChatTemplate.from_bundle(tmp_path).render([]) == "file"


def test_from_bundle_without_template(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="no chat template"):
        ChatTemplate.from_bundle(tmp_path)


# ---------------------------------------------------------------------------------------------
# Parity with transformers' apply_chat_template


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    import transformers
    from tokenizers import Tokenizer, models

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )


@pytest.mark.reference
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_matches_transformers_apply_chat_template(
    hf_tokenizer: Any,
    smollm2_template: str,
    conversation: list[dict[str, Any]],
    add_generation_prompt: bool,
    enable_thinking: bool,
) -> None:
    for source in (QWEN3_STYLE, smollm2_template):
        if source is smollm2_template and any(m["role"] == "tool" for m in conversation):
            continue
        ours = ChatTemplate(source, bos_token="<|im_start|>", eos_token="<|im_end|>").render(
            conversation, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking
        )
        theirs = hf_tokenizer.apply_chat_template(
            conversation,
            chat_template=source,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
        )
        assert ours == theirs


@pytest.mark.reference
def test_matches_transformers_with_tools(hf_tokenizer: Any) -> None:
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"type": "object"}}}]
    conversation = [{"role": "system", "content": "sys"}, {"role": "user", "content": "Weather?"}]
    ours = ChatTemplate(QWEN3_STYLE).render(conversation, tools=tools)
    theirs = hf_tokenizer.apply_chat_template(
        conversation,
        chat_template=QWEN3_STYLE,
        tools=tools,
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert ours == theirs
