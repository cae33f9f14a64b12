"""The appliance's configuration: one YAML file, validated, with environment overrides.

Every section forbids unknown keys, so a typo is an error naming the key and the allowed ones,
not a silently ignored setting discovered weeks later in a gallery. Every field has a default, so
an empty file (or none at all) is the demo configuration of ``appliance.yaml``.

Each setting is defined once: the dataclass its part of the appliance reads (``npu.engine.config``,
``npu.device.thermal.ThermalLimits``, ``handlers.context``) holds its default, and this module
adds the ranges, the descriptions and the mapping onto those dataclasses (``engine_settings`` and
its siblings), by field name.

Model paths: ``ModelConfig.path`` keeps the value as written; ``ApplianceConfig.model_path(m)``
resolves a relative one against the folder of the config file ``load_config`` read (the working
folder when no file was read).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.persona_config import PersonaConfig, SceneConfig
from appliance.wyoming_server import WyomingSettings
from bridge_http.body_guard import DEFAULT_MAX_BODY
from handlers.context import ImageDefaults, Limits
from handlers.speech import LISTEN_IDLE_S
from npu.device.thermal import ThermalLimits
from npu.engine import config as engine
from npu.engine.api import Persona, Priority
from npu.engine.kinds import kind_names
from npu.validation import clean_message

logger = logging.getLogger(__name__)

ENV_PREFIX = "APPLIANCE_"
DEFAULT_FILE = "appliance.yaml"
DEMO_MODEL_ID = "smollm2-135m-instruct"
_WILDCARDS = re.compile(r"[+#\x00]")
_NOT_ONE_LEVEL = re.compile(r"[/+#\x00]")
_ORIGIN = re.compile(r"^https?://[^/\s]+$")
T = TypeVar("T")
KindName = Literal[kind_names()]  # type: ignore[valid-type]  # every module of npu/engine/kinds


def default_of(cls: type[Any], name: str) -> Any:
    """The default the dataclass ``cls`` gives ``name``: the one definition of that setting."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def onto(cls: type[T], *sections: BaseModel, renames: Mapping[str, str] | None = None, **extra: Any) -> T:
    """Build ``cls`` from the fields of ``sections`` it shares by name (or by ``renames``); ``extra``
    gives the rest, or replaces a value the sections hold (a resolved path)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for section in sections:
        for key in type(section).model_fields:
            target = (renames or {}).get(key, key)
            if target in names:
                values[target] = getattr(section, key)
    return cls(**{**values, **extra})


def _origin(value: str) -> str:
    if value != "*" and not _ORIGIN.match(value):
        raise ValueError(f"{value!r} is not an origin: give scheme://host[:port] with no path, or '*'")
    return value


Origin = Annotated[str, AfterValidator(_origin)]


class ConfigError(Exception):
    """A config that cannot be used; the message names every bad key by its dotted path.

    ``problems`` holds one line per bad key (``mqtt.port: ...``), without the header.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


class BaseConfig(BaseModel):
    """Base of every section: unknown keys are errors, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --- mqtt ---------------------------------------------------------------------------------------
class TlsConfig(BaseConfig):
    enabled: bool = Field(False, description="Connect to the broker over TLS (port 8883 usually)")
    ca_certs: str | None = Field(
        None, description="CA bundle that signed the broker's certificate (None: the system's)"
    )
    certfile: str | None = Field(None, description="Client certificate, for mutual TLS")
    keyfile: str | None = Field(None, description="Client private key, for mutual TLS")
    insecure: bool = Field(
        False, description="Skip the broker hostname check (self-signed bench setups only)"
    )

    @model_validator(mode="after")
    def _keyfile_needs_certfile(self) -> TlsConfig:
        if self.keyfile and not self.certfile:
            raise ValueError("keyfile is set but certfile is not; mutual TLS needs both")
        return self


class MqttConfig(BaseConfig):
    host: str = Field("127.0.0.1", min_length=1, max_length=253, description="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="Broker port")
    base_topic: str = Field(
        "appliance",
        min_length=1,
        max_length=200,
        description="Prefix of every topic, one or more levels ('gallery/room1'); unique per appliance",
    )
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="Fixed client id (keeps the persistent session); None derives appliance-<base_topic>",
    )
    protocol: Literal[5, 311] = Field(5, description="MQTT protocol version: 5, or 311 for 3.1.1")
    username: str | None = Field(None, max_length=256, description="Broker user (None: anonymous)")
    password: str | None = Field(None, max_length=256, description="Broker password")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS to the broker")
    shared_group: str | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="Share request topics among appliances as $share/<group>/... (None: not shared)",
    )
    session_expiry: int = Field(
        86400,
        ge=0,
        le=2**32 - 1,
        description="Seconds the broker keeps the session, and prompts queued for it, while offline",
    )
    keepalive: int = Field(30, ge=5, le=3600, description="MQTT keepalive, seconds")
    max_payload: int = Field(
        default_of(Limits, "max_payload"), ge=1024, le=16 * 2**20,
        description="Largest request payload accepted, bytes",
    )

    @field_validator("base_topic")
    @classmethod
    def _base_topic_no_wildcards(cls, value: str) -> str:
        if _WILDCARDS.search(value):
            raise ValueError("must not contain the wildcards + or # (or NUL)")
        return value

    @field_validator("base_topic")
    @classmethod
    def _base_topic_no_empty_level(cls, value: str) -> str:
        if value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError("must not start or end with / nor contain an empty level (//)")
        return value

    @field_validator("base_topic")
    @classmethod
    def _base_topic_not_system(cls, value: str) -> str:
        if value.startswith("$"):
            raise ValueError("must not start with $ (reserved for the broker, e.g. $SYS)")
        return value

    @field_validator("base_topic")
    @classmethod
    def _base_topic_not_reply_space(cls, value: str) -> str:
        if value.split("/")[0] == "replies":
            raise ValueError("must not start with replies (the reply space of every sender)")
        return value

    @field_validator("shared_group")
    @classmethod
    def _group_is_one_level(cls, value: str | None) -> str | None:
        if value is not None and _NOT_ONE_LEVEL.search(value):
            raise ValueError("must be a plain name without / + #")
        return value

    @model_validator(mode="after")
    def _default_client_id(self) -> MqttConfig:
        if self.client_id is None:
            self.client_id = "appliance-" + re.sub(r"[^A-Za-z0-9_-]", "-", self.base_topic)
        return self


# --- http, device, engine, telemetry ------------------------------------------------------------
class HttpConfig(BaseConfig):
    enabled: bool = Field(True, description="Serve the OpenAI-compatible HTTP bridge")
    host: str = Field("0.0.0.0", min_length=1, description="Address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on (0: any free port)")
    api_key: str | None = Field(
        None, min_length=1, max_length=256, description="Bearer token required on /v1/* (None: open)"
    )
    max_body: int = Field(
        DEFAULT_MAX_BODY, ge=1024, le=64 * 2**20,
        description="Largest request body accepted, bytes; more is a 413 before anything is parsed",
    )
    cors_origins: list[Origin] = Field(
        default_factory=list,
        description="Browser origins allowed to call the bridge (CORS), e.g. http://gallery.local:8080, "
        "or '*' for any; empty: CORS off",
    )
    max_n: int = Field(4, ge=1, le=16, description="Largest 'n' (choices per request) accepted")
    raw_prompt_special_tokens: bool = Field(
        False,
        description="Parse special-token texts (<|im_start|>...) in /v1/completions prompts as the "
        "tokens; only for trusted clients that write the chat format themselves",
    )
    sender: Literal["address", "api_key"] = Field(
        "address",
        description="Who an HTTP request counts as in the queue's turns and limits: its client's "
        "address (http:<address>), or its bearer token (http:key-<digest of the token>)",
    )


class ThermalConfig(BaseConfig):
    """The ``device.thermal`` section: ``ThermalLimits`` (its keys without ``_c``) and the engine's
    ``throttle_delay``."""

    warn: float = Field(default_of(ThermalLimits, "warn_c"), ge=30, le=120,
                        description="°C: an event and a warning")
    throttle: float = Field(default_of(ThermalLimits, "throttle_c"), ge=30, le=120,
                            description="°C: one job at a time, cool-down pauses")
    pause: float = Field(default_of(ThermalLimits, "pause_c"), ge=30, le=120,
                         description="°C: no jobs until below the warn level")
    hysteresis: float = Field(default_of(ThermalLimits, "hysteresis_c"), ge=0, le=20,
                              description="°C below a level before leaving it")
    throttle_delay: float = Field(default_of(engine.EngineConfig, "throttle_delay"), ge=0, le=10,
                                  description="Seconds of cool-down between steps")

    @model_validator(mode="after")
    def _rising(self) -> ThermalConfig:
        if not self.warn < self.throttle < self.pause:
            raise ValueError(f"must rise: warn {self.warn} < throttle {self.throttle} < pause {self.pause}")
        return self


class RecoveryConfig(BaseConfig):
    """The ``device.recovery`` section, mapped onto ``npu.engine.config.RecoveryConfig``."""

    attempts: int = Field(default_of(engine.RecoveryConfig, "attempts"), ge=1, le=20,
                          description="Resets tried before the device is declared failed")
    backoff: float = Field(default_of(engine.RecoveryConfig, "backoff"), ge=0, le=600,
                           description="Seconds before the second attempt; doubles")
    backoff_max: float = Field(default_of(engine.RecoveryConfig, "backoff_max"), ge=0, le=3600,
                               description="Longest pause between attempts")


class SimEventConfig(BaseConfig):
    at: float = Field(ge=0, description="Seconds after start")
    temperature_c: float | None = None
    cmm_used_mib: float | None = Field(None, ge=0)
    npu_load_pct: float | None = Field(None, ge=0, le=100)
    fault: Literal["none", "hang", "reset", "dead"] | None = None


class SimConfig(BaseConfig):
    temperature_c: float = Field(50.0, description="Starting temperature of the simulated card")
    cmm_total_mib: float = Field(7040.0, gt=0)
    cmm_used_mib: float = Field(18.0, ge=0)
    script: list[SimEventConfig] = Field(default_factory=list, description="Timed changes and faults")


class DeviceConfig(BaseConfig):
    backend: Literal["auto", "axcl", "smi", "host", "sim"] = Field(
        "auto",
        description="Device monitor: axcl (pyaxcl), smi (axcl-smi), host (no NPU), sim (simulated); "
        "auto picks axcl, then smi, then host",
    )
    ids: list[Annotated[int, Field(ge=0, le=255)]] = Field(
        default_factory=lambda: [0], min_length=1, description="NPU device indices; one worker each"
    )

    smi_path: str = Field("axcl-smi", min_length=1, description="axcl-smi: a name on PATH or a path")
    health_interval: float = Field(2.0, ge=0.2, le=60, description="Seconds between health checks")
    thermal: ThermalConfig = Field(default_factory=lambda: ThermalConfig())
    recovery: RecoveryConfig = Field(default_factory=lambda: RecoveryConfig())
    sim: SimConfig = Field(default_factory=lambda: SimConfig())

    @field_validator("ids")
    @classmethod
    def _ids_unique(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"device ids must be unique, got {value}")
        return value


class EngineConfig(BaseConfig):
    """The ``engine`` section, mapped onto ``npu.engine.config.EngineConfig``."""

    queue_max: int = Field(default_of(engine.EngineConfig, "queue_max"), ge=1, le=10000,
                           description="Jobs that may wait; more are refused 'busy'")
    request_timeout: float = Field(
        default_of(engine.EngineConfig, "request_timeout"), gt=0, le=3600,
        description="Longest a job may take from submission to its end, seconds",
    )
    step_timeout: float = Field(
        default_of(engine.EngineConfig, "step_timeout"), gt=0, le=600,
        description="Watchdog: longest one step (prefill chunk, token) may take, seconds",
    )
    max_active: int = Field(
        default_of(engine.EngineConfig, "max_active"), ge=1, le=16,
        description="Jobs stepped side by side per device (one KV cache each)",
    )
    sender_limits: SenderConfig = Field(
        default_factory=lambda: SenderConfig(),
        description="Limits of every sender no rule of engine.senders names",
    )
    senders: dict[Annotated[str, Field(min_length=1, max_length=200)], SenderConfig] = Field(
        default_factory=dict,
        description="Limits and priority class by sender: a named MQTT sender (its ACL user), mqtt "
        "(every public request), http:<address> or http:key-<digest>; globs such as sensor-* match "
        "several; the first match wins",
    )


PriorityName = Literal[tuple(p.name.lower() for p in Priority)]  # type: ignore[valid-type]


class SenderConfig(BaseConfig):
    """The limits of one sender (``engine.senders``) or of every other one (``engine.sender_limits``),
    mapped onto ``npu.engine.config.SenderLimits``."""

    max_queued: int | None = Field(None, ge=1, le=10000,
                                   description="Requests it may have waiting (None: only engine.queue_max)")
    per_minute: int | None = Field(None, ge=1, le=100000,
                                   description="Requests it may send in any minute (None: no limit)")
    priority: PriorityName | None = Field(
        None, description="The priority class its requests run in, served before lower ones "
        "(None: the request's own: chat normal, images low)")

    def settings(self) -> engine.SenderLimits:
        rank = None if self.priority is None else int(Priority[self.priority.upper()])
        return engine.SenderLimits(max_queued=self.max_queued, per_minute=self.per_minute, priority=rank)


class TelemetryConfig(BaseConfig):
    interval: float = Field(10.0, ge=1, le=3600, description="Seconds between telemetry messages")


DisplayName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$", max_length=64)]


class DisplayConfig(BaseConfig):
    """One display's own settings in ``images.displays``."""

    preview: bool | None = Field(None, description="Previews on this display (None: images.preview)")


class ImagesConfig(BaseConfig):
    display: str = Field(default_of(ImageDefaults, "display"), pattern=r"^[A-Za-z0-9._-]+$", max_length=64,
                         description="The display an image goes to when a request names none")
    format: Literal["png", "jpeg"] = Field(default_of(ImageDefaults, "format"),
                                           description="Image format when a request names none")
    quality: int = Field(default_of(ImageDefaults, "quality"), ge=40, le=100,
                         description="JPEG quality to start from")
    max_bytes: int = Field(
        default_of(ImageDefaults, "max_bytes"), ge=50_000, le=256 * 1024 * 1024,
        description="Largest image published; keep it under the broker's max_packet_size (JPEG steps down)",
    )
    url_ttl: float = Field(3600, ge=10, le=7 * 86400,
                           description="Seconds an HTTP image URL (response_format url) stays valid")
    preview: bool = Field(default_of(ImageDefaults, "preview"),
                          description="JPEG previews on display/<name>/preview after each UNet step "
                          "(a request's preview field wins)")
    preview_size: int = Field(default_of(ImageDefaults, "preview_size"), ge=32, le=1024,
                              description="Pixels on a preview's longer side")
    displays: dict[DisplayName, DisplayConfig] = Field(
        default_factory=dict, description="Per display (by name): its own preview setting")


class ModerationRules(BaseConfig):
    """One display's own prompt gate in ``moderation.displays``: picture prompts for it, and chat
    prompts that name it (``display``)."""

    enabled: bool | None = Field(None, description="Gate this display's prompts (None: moderation.enabled)")
    blocklist: str | None = Field(None, min_length=1, description="A further word list for this display")
    judge: bool | None = Field(None, description="Ask the resident LLM too (None: moderation.judge)")


class ModerationConfig(BaseConfig):
    """The gate for public prompts: a word and phrase list, optionally the resident LLM as a judge."""

    enabled: bool = Field(False, description="Check every chat and image prompt and every text to be "
                          "spoken before it is queued")
    blocklist: str | None = Field(
        None, min_length=1,
        description="Word/phrase list, one a line ('#' comments); whole words, case and accents folded; "
        "relative paths are relative to the config file's folder")
    judge: bool = Field(False, description="Also ask the resident chat model, answering yes or no only")
    judge_model: str | None = Field(None, description="The chat model that judges (None: the default one)")
    curtain: str | None = Field(
        None, min_length=1,
        description="PNG or JPEG shown on the display instead of a refused picture (None: a plain dark one)")
    log_prompts: bool = Field(False, description="Write refused prompts' text to the log (off: never)")
    displays: dict[DisplayName, ModerationRules] = Field(
        default_factory=dict, description="Per display (by name): its own gate")
    trusted: list[Literal["console", "mqtt", "http", "wyoming"]] = Field(
        default_factory=list,
        description="Front doors whose text is not screened (none by default): console (its image box; "
        "only with http.api_key), http (the OpenAI routes, the console's chat box too), mqtt, wyoming")


class JournalConfig(BaseConfig):
    """Durable acceptance: chat and image requests are journaled before the broker is told."""

    enabled: bool = Field(True, description="Journal accepted requests so a crash loses none")
    path: str = Field(
        "state/journal.sqlite3", min_length=1,
        description="The SQLite file; relative paths are relative to the config file's folder",
    )
    sync: Literal["full", "normal"] = Field(
        "full", description="full: survives a power cut (an fsync per request); normal: a crash only"
    )
    dedup_window: float = Field(
        600, ge=0, le=7 * 86400,
        description="Seconds an answered request is remembered, so a resend is not generated again",
    )


class WyomingConfig(BaseConfig):
    """Home Assistant's Wyoming protocol for speech (appliance/wyoming_server.py)."""

    enabled: bool = Field(False, description="Serve speech to text and speech to Home Assistant Assist")
    host: str = Field(default_of(WyomingSettings, "host"), min_length=1, description="Interface to listen on")
    asr_port: int = Field(default_of(WyomingSettings, "asr_port"), ge=0, le=65535,
                          description="Speech to text (0: any free port)")
    tts_port: int = Field(default_of(WyomingSettings, "tts_port"), ge=0, le=65535,
                          description="Text to speech (0: any free port)")
    zeroconf: bool = Field(default_of(WyomingSettings, "zeroconf"),
                           description="Announce both as _wyoming._tcp so Home Assistant discovers them")


class VoiceConfig(BaseConfig):
    wyoming: WyomingConfig = Field(default_factory=WyomingConfig, description="The Wyoming servers")
    listen_idle: float = Field(LISTEN_IDLE_S, gt=0, le=3600, description=(
        "Seconds a microphone stream ({base}/listen/<node>/...) may send no audio before it is "
        "answered timeout and its slot is freed (its node went away)"))


class HomeAssistantConfig(BaseConfig):
    enabled: bool = Field(True, description="Publish Home Assistant MQTT discovery (retained)")
    name: str | None = Field(None, min_length=1, max_length=64, description="Device name shown in HA")
    birth_payload: str = Field(
        "online", min_length=1, max_length=256,
        description="HA's birth message on homeassistant/status (its MQTT option): send discovery again",
    )


# --- models -------------------------------------------------------------------------------------
class ModelConfig(BaseConfig):
    """One resident model. ``path`` is kept as written; see ``ApplianceConfig.model_path``."""

    id: str = Field(
        ..., pattern=r"^[a-zA-Z0-9._-]+$", max_length=64, description="The name clients ask for"
    )
    kind: KindName = Field("chat", description="What the model does: its job kind")
    path: str = Field(
        ..., min_length=1, description="Bundle folder; a relative one is relative to the config file's folder"
    )
    runtime: Literal["auto", "axcl", "axengine", "onnx", "espeak-ng", "pocketsphinx"] = Field(
        "auto",
        description="Session backend: axcl (the card through pyaxcl, device-resident KV cache), axengine "
        "(the card through PyAXEngine), onnx (CPU), auto (the first of these that works here); for a tts "
        "model espeak-ng (the fallback voice), for an stt model pocketsphinx (the light fallback)",
    )
    preload: bool = Field(True, description="Load at start and keep resident")
    default: bool = Field(False, description="The model of its kind used when a request names none")
    aliases: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=list,
        description="More names clients may ask for it by (gpt-4o-mini), so code written for another "
        "API works after changing only its base_url",
    )


    @model_validator(mode="after")
    def _runtime_fits_kind(self) -> ModelConfig:
        fallback = {"espeak-ng": "tts", "pocketsphinx": "stt"}.get(self.runtime)
        if fallback is not None and self.kind != fallback:
            raise ValueError(f"runtime {self.runtime} runs a {fallback} model, not a {self.kind} one")
        return self


def _demo_models() -> list[ModelConfig]:
    return [ModelConfig(id=DEMO_MODEL_ID, kind="chat", path=f"models/{DEMO_MODEL_ID}", runtime="auto"),
            # the voices appliance/demo_voice.py installs
            ModelConfig(id="joe-us-medium", kind="tts", path="models/joe-us-medium"),
            ModelConfig(id="whisper-tiny-en", kind="stt", path="models/whisper-tiny-en")]


class ApplianceConfig(BaseConfig):
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="The broker and the topic tree")
    http: HttpConfig = Field(default_factory=HttpConfig, description="The OpenAI-compatible HTTP bridge")
    device: DeviceConfig = Field(default_factory=DeviceConfig, description="NPU devices and their monitor")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Job queue and time limits")
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig, description="Telemetry publishing")
    images: ImagesConfig = Field(
        default_factory=ImagesConfig, description="Generated images: displays, format, size"
    )
    homeassistant: HomeAssistantConfig = Field(
        default_factory=HomeAssistantConfig, description="Home Assistant discovery"
    )
    voice: VoiceConfig = Field(default_factory=VoiceConfig, description="Speech: the Wyoming servers")
    journal: JournalConfig = Field(
        default_factory=JournalConfig, description="Durable acceptance of requests (crash safety)"
    )
    moderation: ModerationConfig = Field(
        default_factory=ModerationConfig, description="The gate for public prompts (word list, LLM judge)"
    )
    models: list[ModelConfig] = Field(
        default_factory=_demo_models, min_length=1, description="Resident models (default: the demo model)"
    )
    personas: list[PersonaConfig] = Field(
        default_factory=list, description="The installation's characters: a model, a system prompt, defaults"
    )
    scenes: list[SceneConfig] = Field(
        default_factory=list, description="Named sets of personas and settings, on a schedule or by request"
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("models")
    @classmethod
    def _model_ids_unique(cls, value: list[ModelConfig]) -> list[ModelConfig]:
        ids = [m.id for m in value]
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        if repeated:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(repeated)}")
        return value

    @field_validator("models")
    @classmethod
    def _one_default_per_kind(cls, value: list[ModelConfig]) -> list[ModelConfig]:
        for kind in kind_names():
            defaults = [m.id for m in value if m.kind == kind and m.default]
            if len(defaults) > 1:
                raise ValueError(f"only one {kind} model may be the default; marked: {', '.join(defaults)}")
        return value

    @model_validator(mode="after")
    def _names_are_unique(self) -> ApplianceConfig:
        """Model ids, aliases and persona names share one namespace: the ``model`` clients send."""
        names = [n for m in self.models for n in (m.id, *m.aliases)] + [p.name for p in self.personas]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model ids, aliases and persona names must all differ; repeated: "
                             f"{', '.join(repeated)}")
        scenes = [s.name for s in self.scenes]
        if len(set(scenes)) != len(scenes):
            raise ValueError(f"scene names must be unique: {', '.join(scenes)}")
        return self

    @model_validator(mode="after")
    def _personas_name_chat_models(self) -> ApplianceConfig:
        chat = [m.id for m in self.models if m.kind == "chat"]
        for persona in self.personas:
            if persona.model is not None and persona.model not in chat:
                raise ValueError(f"persona {persona.name!r}: model {persona.model!r} is not a chat model "
                                 f"here; chat models: {', '.join(chat) or 'none'}")
        return self

    @model_validator(mode="after")
    def _scenes_name_what_exists(self) -> ApplianceConfig:
        personas, models = {p.name for p in self.personas}, {m.id for m in self.models}
        for scene in self.scenes:
            named = [*(scene.personas or []), *([scene.default_persona] if scene.default_persona else [])]
            unknown = sorted(set(named) - personas)
            if unknown:
                raise ValueError(f"scene {scene.name!r}: no persona {unknown[0]!r}; personas: "
                                 f"{', '.join(sorted(personas)) or 'none'}")
            unknown = sorted(set(scene.load + scene.unload) - models)
            if unknown:
                raise ValueError(f"scene {scene.name!r}: no model {unknown[0]!r}; models: "
                                 f"{', '.join(sorted(models))}")
        return self

    @property
    def base_dir(self) -> Path:
        """The folder relative model paths are resolved against."""
        return self._base_dir

    def journal_path(self) -> Path:
        """The journal's file; a relative path is relative to the config file's folder."""
        path = Path(self.journal.path).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    def model_path(self, model: ModelConfig) -> Path:
        """A model's bundle folder; a relative path is relative to the config file's folder."""
        path = Path(model.path).expanduser()
        return path if path.is_absolute() else self._base_dir / path

    # --- onto the dataclasses the parts read ------------------------------------------------------
    def engine_settings(self) -> engine.EngineConfig:
        return onto(engine.EngineConfig, self.engine, self.device.thermal,
                    sender_limits=self.engine.sender_limits.settings(),
                    senders={name: rule.settings() for name, rule in self.engine.senders.items()})

    def recovery_settings(self) -> engine.RecoveryConfig:
        return onto(engine.RecoveryConfig, self.device.recovery)

    def thermal_limits(self) -> ThermalLimits:
        thermal = self.device.thermal
        return onto(ThermalLimits, thermal, renames={k: f"{k}_c" for k in ("warn", "throttle", "pause",
                                                                           "hysteresis")})

    def model_specs(self) -> list[engine.ModelSpec]:
        """The models, each with its aliases and its personas' system prompts to keep warm."""
        personas = self.engine_personas()
        return [onto(engine.ModelSpec, m, path=self.model_path(m), aliases=tuple(m.aliases),
                     prefixes=tuple(dict.fromkeys(p.system for p in personas if p.model == m.id)))
                for m in self.models]

    def default_chat_model(self) -> str | None:
        chat = [m for m in self.models if m.kind == "chat"]
        return next((m.id for m in chat if m.default), chat[0].id if chat else None)

    def engine_personas(self) -> list[Persona]:
        """The personas as the engine holds them, each on its model (the default chat one if unnamed)."""
        return [p.persona(p.model or self.default_chat_model()) for p in self.personas]

    def resident_models(self, scene: SceneConfig | None = None) -> list[ModelConfig]:
        """The models on the card: the preloaded ones, or during ``scene`` its own set (preloaded
        minus what it unloads, plus what it loads)."""
        if scene is None:
            return [m for m in self.models if m.preload]
        return [m for m in self.models if (m.preload and m.id not in scene.unload) or m.id in scene.load]

    def image_defaults(self) -> ImageDefaults:
        previews = {name: d.preview for name, d in self.images.displays.items() if d.preview is not None}
        return onto(ImageDefaults, self.images, displays=previews)

    def config_path(self, value: str) -> Path:
        """A file the config names; a relative path is relative to the config file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self._base_dir / path


# --- error messages -----------------------------------------------------------------------------
def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _field_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[type[BaseModel] | None, Any]:
    """The model class holding ``loc``'s last key, and that key's annotation (None when unknown)."""
    model: type[BaseModel] | None = root
    annotation: Any = None
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None, None
        annotation = model.model_fields[part].annotation
        model = _model_in(annotation)
    return model, annotation


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model an annotation holds directly or as list items, if any."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _allowed_keys(root: type[BaseModel], section: tuple[int | str, ...]) -> list[str]:
    model = root if not section else _field_at(root, section)[0]
    return list(model.model_fields) if model is not None else []


def _literal_values(annotation: Any) -> list[Any]:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    for arg in get_args(annotation):
        values = _literal_values(arg)
        if values:
            return values
    return []


def format_errors(
    error: ValidationError,
    root: type[BaseModel] = ApplianceConfig,
    sources: Mapping[tuple[str, ...], str] | None = None,
) -> list[str]:
    """One line per problem: ``<dotted.key>: <what is wrong>; allowed: ...``.

    Args:
        sources: dotted locations set from the environment -> the variable's name, so a bad
            override is reported as coming from it.
    """
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        where = _dotted(loc)
        kind = item["type"]
        value = item.get("input")
        if kind == "extra_forbidden":
            what = "unknown section" if len(loc) == 1 else "unknown key"
            problem = f"{what}; allowed: {', '.join(_allowed_keys(root, loc[:-1]))}"
        elif kind == "literal_error":
            allowed = _literal_values(_field_at(root, loc)[1])
            shown = ", ".join(str(v) for v in allowed) or item.get("ctx", {}).get("expected", "")
            problem = f"{value!r} is not allowed; allowed: {shown}"
        elif kind == "missing":
            problem = "required"
        elif kind == "model_type":
            problem = f"must be a mapping of keys; allowed: {', '.join(_allowed_keys(root, loc))}"
        else:
            problem = clean_message(item["msg"])
            if isinstance(value, str | int | float | bool) or value is None:
                problem += f" (got {value!r})"
        text_loc = tuple(str(p) for p in loc)
        origin = next((name for path, name in (sources or {}).items() if text_loc[: len(path)] == path), None)
        lines.append(f"{where}{f' (from {origin})' if origin else ''}: {problem}")
    return lines


# --- environment overrides ----------------------------------------------------------------------
def _accepts_text(annotation: Any) -> bool:
    """Whether a field takes text as is (so ``APPLIANCE_HTTP_API_KEY=0123`` stays a string)."""
    if annotation is str:
        return True
    if get_origin(annotation) is Literal:
        return all(isinstance(v, str) for v in get_args(annotation))
    if get_origin(annotation) in (Union, types.UnionType):
        return any(_accepts_text(a) for a in get_args(annotation) if a is not type(None))
    return False


def _accepts_none(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def _match_key(fields: Mapping[str, Any], parts: list[str]) -> tuple[str | None, list[str]]:
    """The longest field name made of the leading parts (keys may contain underscores)."""
    for n in range(len(parts), 0, -1):
        candidate = "_".join(parts[:n])
        if candidate in fields:
            return candidate, parts[n:]
    return None, []


def _env_target(name: str) -> tuple[tuple[str, ...], Any]:
    """The dotted location an ``APPLIANCE_...`` variable names, and the annotation found there."""
    parts = name[len(ENV_PREFIX) :].lower().split("_")
    sections = [k for k, f in ApplianceConfig.model_fields.items() if get_origin(f.annotation) is not list]
    if parts[0] == "models":
        raise ValueError(f"{name}: models is a list; edit it in the config file")
    if parts[0] not in sections or len(parts) < 2 or not all(parts[1:]):
        raise ValueError(
            f"{name}: unknown section {parts[0]!r}; environment overrides are "
            f"APPLIANCE_<SECTION>_<KEY> with sections {', '.join(s.upper() for s in sections)}"
        )
    model: type[BaseModel] | None = _model_in(ApplianceConfig.model_fields[parts[0]].annotation)
    loc, rest = [parts[0]], parts[1:]
    annotation: Any = None
    while rest and model is not None:
        key, after = _match_key(model.model_fields, rest)
        inner = _model_in(model.model_fields[key].annotation) if key else None
        if key is None or (after and inner is None):
            raise ValueError(
                f"{name}: {'.'.join(loc)} has no key {'_'.join(rest)!r}; "
                f"allowed: {', '.join(model.model_fields)}"
            )
        loc.append(key)
        annotation = model.model_fields[key].annotation
        model, rest = inner, after
    return tuple(loc), annotation


def _parse_env_value(name: str, raw: str, annotation: Any) -> Any:
    if raw == "" and _accepts_none(annotation):
        return None
    if _accepts_text(annotation):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ValueError(f"{name}: {raw!r} is not a YAML value ({exc.__class__.__name__})") from None


def apply_env_overrides(
    data: Mapping[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Overlay ``APPLIANCE_<SECTION>_<KEY>[_<SUBKEY>]`` variables on the file's data.

    Values parse as YAML scalars (``1884``, ``true``, ``null``, ``[0, 1]``), except for text
    fields, which take the value as is. An empty value sets an optional key to None.

    Returns:
        The merged data (the input is not modified) and, per overridden location, the variable.

    Raises:
        ConfigError: a variable names no known section or key; the message names each one.
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    sources: dict[tuple[str, ...], str] = {}
    problems: list[str] = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        try:
            loc, annotation = _env_target(name)
            value = _parse_env_value(name, env[name], annotation)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        target = out
        for key in loc[:-1]:
            inner = target.get(key)
            target[key] = dict(inner) if isinstance(inner, dict) else {}
            target = target[key]
        target[loc[-1]] = value
        sources[loc] = name
    if problems:
        raise ConfigError("bad environment overrides:\n  " + "\n  ".join(problems), problems)
    return out, sources


# --- loading ------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (mqtt:, http:, ...)")
    # A section whose keys are all commented out reads as null: treat it as "all defaults".
    return {k: v for k, v in loaded.items() if v is not None}


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> ApplianceConfig:
    """Read the YAML file, overlay environment overrides, validate.

    Args:
        path: the config file; ``None`` reads ``appliance.yaml`` in the working folder when it
            exists and uses the defaults otherwise. An explicit path that does not exist is an error.
        env: the environment to take ``APPLIANCE_*`` overrides from (default ``os.environ``).

    Raises:
        ConfigError: listing every bad key by its dotted path, with what is allowed.
    """
    env = os.environ if env is None else env
    if path is None and Path(DEFAULT_FILE).is_file():
        path = Path(DEFAULT_FILE)
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data = _read_yaml(path)
    else:
        logger.debug("no %s here; using the defaults", DEFAULT_FILE)
    data, sources = apply_env_overrides(data, env)
    try:
        config = ApplianceConfig.model_validate(data)
    except ValidationError as exc:
        problems = format_errors(exc, ApplianceConfig, sources)
        where = str(path) if path is not None else "the defaults with environment overrides"
        raise ConfigError(f"invalid config ({where}):\n  " + "\n  ".join(problems), problems) from None
    config._base_dir = path.resolve().parent if path is not None else Path.cwd()
    return config
