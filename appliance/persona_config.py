"""The ``personas:`` and ``scenes:`` sections: the installation's characters and its day.

A persona is a name requests use (``"persona": "coyote"`` on MQTT, ``model: "coyote"`` over HTTP)
for a model, a system prompt and sampling defaults; its system prompt is prefilled at load and
kept warm on its model. A scene is a named set of personas with the settings that go with it,
started on a cron schedule (APScheduler's crontab syntax) or by request. docs/OPERATIONS.md
explains both with the coyote example.

Sections follow the rules of ``appliance.config.BaseConfig`` (unknown keys are errors, defaults
validated); ``appliance.config`` checks how they refer to the models and to each other.
"""

from __future__ import annotations

from typing import Annotated, Any

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from npu.engine.api import ImageStyle, Persona
from npu.llm.params import PARAM_BOUNDS
from npu.validation import bounded

NAME = r"^[a-zA-Z0-9._-]+$"
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "seed", "max_tokens")


def _bound(name: str) -> Any:
    return bounded(PARAM_BOUNDS[name])


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ImageStyleConfig(_Section):
    prefix: str = Field("", max_length=2000, description="Words put before every image prompt")
    suffix: str = Field("", max_length=2000, description="Words put after every image prompt")
    negative_prompt: str | None = Field(None, max_length=2000,
                                        description="Negative prompt when a request gives none")
    steps: int | None = Field(None, ge=1, le=8, description="Steps when a request gives none")


class PersonaConfig(_Section):
    """One persona; every sampling field left out keeps the engine's default."""

    name: str = Field(..., pattern=NAME, max_length=64, description="What requests name it by")
    model: str | None = Field(None, description="Its chat model's id (None: the default chat model)")
    system: str = Field(..., min_length=1, max_length=32000, description="Its system prompt, kept warm")
    description: str = Field("", max_length=500, description="What it is, for people (the console)")
    max_tokens: Annotated[StrictInt | None, _bound("max_tokens")] = None
    temperature: Annotated[float | None, _bound("temperature")] = None
    top_p: Annotated[float | None, _bound("top_p")] = None
    top_k: Annotated[StrictInt | None, _bound("top_k")] = None
    min_p: Annotated[float | None, _bound("min_p")] = None
    repetition_penalty: Annotated[float | None, _bound("repetition_penalty")] = None
    presence_penalty: Annotated[float | None, _bound("presence_penalty")] = None
    frequency_penalty: Annotated[float | None, _bound("frequency_penalty")] = None
    seed: Annotated[StrictInt | None, _bound("seed")] = None
    stop: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=16, description="Stop strings when a request gives none")
    image: ImageStyleConfig | None = Field(None, description="Its images' style")

    def persona(self, model: str | None) -> Persona:
        defaults = {f: getattr(self, f) for f in SAMPLING if getattr(self, f) is not None}
        if self.stop:
            defaults["stop"] = tuple(self.stop)
        image = None if self.image is None else ImageStyle(**self.image.model_dump())
        return Persona(self.name, self.system, model, defaults, image)


class SceneConfig(_Section):
    """A named set of personas and settings, switched on a schedule or by request."""

    name: str = Field(..., pattern=NAME, max_length=64, description="What the schedule and requests call it")
    start: str | None = Field(
        None, description="When it begins, as a crontab line 'minute hour day month weekday' "
        "(APScheduler's syntax: '0 10 * * mon-fri'); None: only by request")
    personas: list[str] | None = Field(None, description="The personas requests may name (None: all)")
    default_persona: str | None = Field(None, description="The persona of a chat request that names "
                                        "neither a persona nor a model")
    load: list[str] = Field(default_factory=list, description="Models loaded for it (not preloaded ones)")
    unload: list[str] = Field(default_factory=list, description="Models unloaded for it, freeing the card")
    prepare: float = Field(0, ge=0, le=3600, description="Seconds before its start that load/unload happen")

    @field_validator("start")
    @classmethod
    def _crontab(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                CronTrigger.from_crontab(value)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a crontab line (minute hour day month weekday): {exc}") \
                    from None
        return value

    @model_validator(mode="after")
    def _default_is_in_the_scene(self) -> SceneConfig:
        if self.default_persona and self.personas is not None and self.default_persona not in self.personas:
            raise ValueError(f"default_persona {self.default_persona!r} is not one of its personas")
        return self

    @model_validator(mode="after")
    def _load_or_unload(self) -> SceneConfig:
        both = sorted(set(self.load) & set(self.unload))
        if both:
            raise ValueError(f"a model cannot be both loaded and unloaded: {', '.join(both)}")
        return self

    def trigger(self) -> CronTrigger | None:
        return None if self.start is None else CronTrigger.from_crontab(self.start)
