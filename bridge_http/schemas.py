"""The OpenAI request bodies the bridge accepts, as pydantic models.

Unknown fields are ignored, as OpenAI clients expect (they send ``user``, ``metadata``,
``store``...). Known fields this appliance cannot honour (images, audio, ``suffix``) are refused
with a message naming the field, rather than silently producing something else. Structured output
(``response_format``, ``tools``, ``logit_bias``, ``logprobs``) is enforced by the sampler
(``bridge_http/structured.py``). Numeric
controls are held to the ranges of ``npu.llm.params.PARAM_BOUNDS``, and numbers must be finite.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from npu.llm.params import PARAM_BOUNDS
from npu.sentences import MAX_WIDTH, MIN_WIDTH
from npu.validation import bounded

MAX_STOP = 16


def _bound(name: str) -> Any:
    """The validator holding a generation control to its ``PARAM_BOUNDS`` range."""
    return bounded(PARAM_BOUNDS[name])


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ImagePart(RequestModel):
    type: Literal["image_url", "input_audio", "file", "refusal"]


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(RequestModel):
    name: str
    arguments: str = "{}"


class ToolCallIn(RequestModel):
    """An earlier answer's call, as the client sends it back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: which call this is the result of

    @field_validator("content")
    @classmethod
    def _text_only(cls, content: str | list[Any] | None) -> str | list[Any] | None:
        if isinstance(content, list):
            other = [p.type for p in content if not isinstance(p, TextPart)]
            if other:
                raise ValueError(
                    f"this model reads text only; content parts of type {other[0]!r} are not supported"
                )
        return content

    def text(self) -> str:
        """The content as one string; text parts are joined by newlines (as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def for_template(self) -> dict[str, Any]:
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.role == "tool" and self.name is not None:
            message["name"] = self.name
        return message


class StreamOptions(RequestModel):
    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # every schema is enforced; strict also closes its objects


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object ({name, schema, strict})")
        return self


class FunctionDef(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]


class SamplingFields(RequestModel):
    """Fields shared by chat and legacy completions; ``None`` keeps the engine default."""

    model: str | None = None
    persona: str | None = None  # a persona by name (also accepted as ``model``)
    max_tokens: Annotated[int | None, _bound("max_tokens")] = None
    temperature: Annotated[float | None, _bound("temperature")] = None
    top_p: Annotated[float | None, _bound("top_p")] = None
    top_k: Annotated[int | None, _bound("top_k")] = None
    min_p: Annotated[float | None, _bound("min_p")] = None
    repetition_penalty: Annotated[float | None, _bound("repetition_penalty")] = None
    presence_penalty: Annotated[float | None, _bound("presence_penalty")] = None
    frequency_penalty: Annotated[float | None, _bound("frequency_penalty")] = None
    seed: Annotated[int | None, _bound("seed")] = None  # -1: random, as llama.cpp clients send
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stop

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int | None, _bound("max_tokens")] = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: LogitBias | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    enable_thinking: bool = False  # for reasoning models whose template knows the switch
    # The appliance's own: a stream's deltas as whole sentences or lines of ``width`` (npu/sentences.py).
    chunk: Literal["sentence", "line"] | None = None
    width: int | None = Field(None, ge=MIN_WIDTH, le=MAX_WIDTH)

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` wins over the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    logit_bias: LogitBias | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
