"""Chat templates: turn OpenAI-style messages into the prompt text a model was trained on.

Models ship their prompt format as a Jinja template written for Hugging Face transformers, so
it is rendered the way transformers renders it (``apply_chat_template(tokenize=False)``): a
sandboxed, immutable Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a ``{% generation %}`` tag, and the helpers templates call
(``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text). Templates come
from downloaded model bundles: they are untrusted code, hence the sandbox.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from npu.llm import tools as _tools

logger = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant", "tool"})
# transformers fills every one of these names from whichever one a message carries.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body unchanged.

    transformers uses the tag to mark assistant tokens for training masks; some templates
    contain it, and without the extension they would not even parse.
    """

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII text, which would change prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _plain(value: Any, where: str) -> Any:
    """A copy made of JSON types only: the template never sees (or mutates) caller objects."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, bytes | bytearray):
        return [_plain(v, where) for v in value]
    raise ValueError(f"{where}: {type(value).__name__} values are not allowed in a chat message")


def _flatten_content(content: Any, where: str) -> Any:
    """A list of text parts becomes one string (parts joined by newlines, as vLLM does)."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, Sequence) or isinstance(content, bytes | bytearray):
        raise ValueError(f"{where}: content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise ValueError(f"{where}, content part {j}: must be an object {{'type': 'text', 'text': ...}}")
        kind = part.get("type")
        if kind != "text":
            raise ValueError(
                f"{where}, content part {j}: type {kind!r} is not supported; only 'text' parts are"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}, content part {j}: 'text' must be a string")
        texts.append(text)
    return "\n".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validate roles, flatten text parts and copy the messages into plain JSON data.

    Raises:
        ValueError: naming the message (by index) and what is wrong with it.
    """
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"message {i}"
        if not isinstance(message, Mapping):
            raise ValueError(f"{where}: must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: role {role!r} is not one of {', '.join(sorted(ROLES))}")
        plain = {
            str(k): _flatten_content(v, where) if k == "content" else _plain(v, where)
            for k, v in message.items()
        }
        reasoning = next((plain[k] for k in _REASONING_FIELDS if plain.get(k) is not None), None)
        if reasoning is not None:
            plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
        out.append(plain)
    return out


def _token_text(value: Any) -> str | None:
    """``bos_token`` / ``eos_token`` as tokenizer_config.json stores them: a string or an AddedToken."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A model's chat template, compiled once, rendered per request.

    Args:
        template: the Jinja source, or named sources (``"default"`` is used, ``"tool_use"``
            when tools are given and the bundle has one).
        bos_token, eos_token: the texts templates see as ``bos_token`` / ``eos_token``.
    """

    def __init__(
        self,
        template: str | Mapping[str, str],
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        sources = {"default": template} if isinstance(template, str) else dict(template)
        if "default" not in sources:
            raise ValueError(f"no 'default' chat template among {sorted(sources)}")
        env = _environment()
        self._templates: dict[str, jinja2.Template] = {}
        for name, source in sources.items():
            try:
                self._templates[name] = env.from_string(source)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"chat template {name!r} does not parse: {e}") from e
        self.sources = sources
        self.knows_tools = {
            name: _tools.template_knows_tools(env, source) for name, source in sources.items()
        }
        self.special_tokens = {
            k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None
        }

    @classmethod
    def from_bundle(cls, directory: str | Path) -> ChatTemplate:
        """Read the template and special tokens from a model bundle directory.

        Like transformers, ``chat_template.jinja`` (and ``additional_chat_templates/*.jinja``)
        take priority over ``chat_template`` in tokenizer_config.json, which may be a string or
        a list of ``{"name", "template"}``.
        """
        path = Path(directory)
        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            config = json.loads(config_file.read_text(encoding="utf-8"))
        template: Any = config.get("chat_template")
        if isinstance(template, list):
            template = {entry["name"]: entry["template"] for entry in template}
        files: dict[str, str] = {}
        if (path / "chat_template.jinja").is_file():
            files["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        extra_dir = path / "additional_chat_templates"
        if extra_dir.is_dir():
            for file in sorted(extra_dir.glob("*.jinja")):
                files[file.stem] = file.read_text(encoding="utf-8")
        if files:
            template = files
        if not template:
            raise ValueError(
                f"{path}: no chat template (none in tokenizer_config.json, no chat_template.jinja)"
            )
        return cls(
            template,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
        )

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for ``messages``.

        ``enable_thinking`` is passed to the template (Qwen3 templates read it); it defaults to
        off, whereas a Qwen3 template left without the variable would think. ``extra`` becomes
        more template variables.

        Raises:
            ValueError: a bad message, or the template refused the conversation (the message is
                the template's own, e.g. from ``raise_exception``).
        """
        name = "tool_use" if tools is not None and "tool_use" in self._templates else "default"
        uses_tools = tools is not None or any(
            m.get("role") == "tool" or m.get("tool_calls") for m in messages if isinstance(m, Mapping)
        )
        if uses_tools and self.knows_tools[name]:
            messages = _tools.template_messages(messages)
        elif uses_tools:  # no tool syntax in this template: the documented fallback
            messages, tools = _tools.fallback_messages(messages, tools), None
        conversation = normalize_messages(messages)
        context = {
            **self.special_tokens,
            "messages": conversation,
            "tools": _plain(tools, "tools"),
            "documents": _plain(documents, "documents"),
            "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking,
            **{k: _plain(v, k) for k, v in extra.items()},
        }
        try:
            return self._templates[name].render(**context)
        except jinja2.TemplateError as e:
            raise ValueError(str(e)) from e
        except (TypeError, LookupError, AttributeError) as e:
            raise ValueError(f"the chat template cannot render these messages: {e}") from e
