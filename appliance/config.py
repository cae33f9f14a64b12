"""The appliance's configuration: one YAML file, validated, with environment overrides.

Every section forbids unknown keys, so a typo is an error naming the key and the allowed ones,
not a silently ignored setting discovered weeks later in a gallery.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "APPLIANCE_"
DEFAULT_FILE = "appliance.yaml"
_TOPIC_BAD = re.compile(r"[+#\x00]")


class ConfigError(Exception):
    """A config that cannot be used; the message names every bad key by its dotted path."""


class BaseConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class TlsConfig(BaseConfig):
    enabled: bool = Field(False, description="Connect to the broker over TLS")
    ca_certs: str | None = Field(None, description="CA bundle that signed the broker's certificate")
    certfile: str | None = Field(None, description="Client certificate (mutual TLS)")
    keyfile: str | None = Field(None, description="Client private key (mutual TLS)")
    insecure: bool = Field(False, description="Skip hostname verification (self-signed gallery setups)")


class MqttConfig(BaseConfig):
    host: str = Field("127.0.0.1", min_length=1, description="Broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="Broker port")
    base_topic: str = Field(
        "appliance", min_length=1, max_length=200, description="Prefix of every topic; unique per appliance"
    )
    client_id: str | None = Field(
        None, max_length=128, description="Fixed client id (persistent session); default from base_topic"
    )
    protocol: Literal[5, 311] = Field(5, description="MQTT protocol version: 5 or 311 (3.1.1)")
    username: str | None = Field(None, description="Broker user")
    password: str | None = Field(None, description="Broker password")
    tls: TlsConfig = Field(default_factory=TlsConfig)
    shared_group: str | None = Field(
        None, description="Share request topics among appliances ($share/<group>/...)"
    )
    session_expiry: int = Field(
        86400, ge=0, le=2**32 - 1, description="Seconds the broker keeps the session (and queued prompts)"
    )
    keepalive: int = Field(30, ge=5, le=3600, description="MQTT keepalive in seconds")
    max_payload: int = Field(
        65536, ge=1024, le=16 * 2**20, description="Largest request payload accepted, bytes"
    )

    @field_validator("base_topic")
    @classmethod
    def _topic_levels(cls, value: str) -> str:
        if _TOPIC_BAD.search(value) or value.startswith(("/", "$")) or value.endswith("/") or "//" in value:
            raise ValueError(
                "must be plain topic levels: no + # NUL, no leading $ or /, no trailing or empty level"
            )
        return value

    @field_validator("shared_group")
    @classmethod
    def _group_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or re.search(r"[/+#\x00]", value)):
            raise ValueError("must be a non-empty name without / + #")
        return value

    @model_validator(mode="after")
    def _default_client_id(self) -> MqttConfig:
        if not self.client_id:
            self.client_id = "appliance-" + self.base_topic.replace("/", "-")
        return self


class HttpConfig(BaseConfig):
    enabled: bool = Field(True, description="Serve the OpenAI-compatible HTTP bridge")
    host: str = Field("0.0.0.0", description="Address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on")
    api_key: str | None = Field(None, description="Bearer token required on /v1/* (None: open)")
    max_n: int = Field(4, ge=1, le=16, description="Largest 'n' (choices per request) accepted")


class DeviceConfig(BaseConfig):
    backend: Literal["auto", "axcl", "smi", "host", "sim"] = Field("auto", description="Device monitor")
    ids: list[int] = Field(default_factory=lambda: [0], min_length=1, description="NPU device indices")

    @field_validator("ids")
    @classmethod
    def _unique_ids(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value) or any(i < 0 for i in value):
            raise ValueError("device ids must be unique and non-negative")
        return value


class EngineSettings(BaseConfig):
    queue_max: int = Field(32, ge=1, le=10000, description="Jobs that may wait; more are refused 'busy'")
    request_timeout: float = Field(120.0, gt=0, le=3600, description="Longest a job may run, seconds")
    step_timeout: float = Field(
        30.0, gt=0, le=600, description="Watchdog: longest one step may take, seconds"
    )
    max_active: int = Field(2, ge=1, le=16, description="Jobs stepped concurrently per device (KV caches)")


class TelemetryConfig(BaseConfig):
    interval: float = Field(10.0, ge=1, le=3600, description="Seconds between telemetry messages")


class ModelConfig(BaseConfig):
    id: str = Field(..., pattern=r"^[a-zA-Z0-9._-]+$", max_length=64, description="Name clients ask for")
    kind: Literal["chat", "image"] = Field("chat", description="What the model does")
    path: str = Field(..., min_length=1, description="Bundle folder; relative to the config file's folder")
    runtime: Literal["auto", "axengine", "onnx"] = Field("auto", description="Session backend")
    preload: bool = Field(True, description="Load at start and keep resident")
    default: bool = Field(False, description="The model used when a request names none")


class ApplianceConfig(BaseConfig):
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    models: list[ModelConfig] = Field(default_factory=list, description="Resident models")

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @model_validator(mode="after")
    def _unique_model_ids(self) -> ApplianceConfig:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"model ids must be unique; repeated: {', '.join(duplicates)}")
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir

    def model_path(self, model: ModelConfig) -> Path:
        """A model's bundle folder; a relative path is relative to the config file's folder."""
        path = Path(model.path).expanduser()
        return path if path.is_absolute() else self._base_dir / path


def _format_errors(error: ValidationError, root: type[BaseModel]) -> str:
    lines = []
    for item in error.errors():
        loc = [str(p) for p in item["loc"]]
        where = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(_fields_at(root, item["loc"][:-1]))
            lines.append(f"{where}: unknown key; allowed: {allowed}")
        elif item["type"] == "literal_error":
            lines.append(f"{where}: {item['msg']}")
        else:
            lines.append(f"{where}: {item['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _fields_at(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next(
            (a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
        if model is None:
            return []
    return list(model.model_fields)


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """``APPLIANCE_<SECTION>_<KEY>[_<SUBKEY>]=value`` overrides one key; values parse as YAML scalars."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("_")
        section = parts[0]
        field = ApplianceConfig.model_fields.get(section)
        sub = getattr(field.annotation, "model_fields", None) if field else None
        if not sub or len(parts) < 2:
            raise ConfigError(
                f"{name}: no config section {section!r}; sections: mqtt, http, device, engine, telemetry"
            )
        key, rest = _match_key(sub, parts[1:])
        if key is None:
            raise ConfigError(f"{name}: {section} has no key {'_'.join(parts[1:])!r}; keys: {', '.join(sub)}")
        value = yaml.safe_load(raw) if raw != "" else None
        target = out.setdefault(section, {})
        if rest:
            nested = getattr(sub[key].annotation, "model_fields", None)
            subkey = "_".join(rest)
            if not nested or subkey not in nested:
                raise ConfigError(f"{name}: {section}.{key} has no key {subkey!r}")
            target.setdefault(key, {})
            target[key] = {**target[key], subkey: value}
        else:
            target[key] = value
    return out


def _match_key(fields: Mapping[str, Any], parts: list[str]) -> tuple[str | None, list[str]]:
    """The longest field name made of the leading parts (keys may contain underscores)."""
    for n in range(len(parts), 0, -1):
        candidate = "_".join(parts[:n])
        if candidate in fields:
            return candidate, parts[n:]
    return None, []


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> ApplianceConfig:
    """Read, override from the environment, and validate.

    ``path=None`` reads ``appliance.yaml`` in the working folder when present, else defaults.
    """
    env = os.environ if env is None else env
    if path is None:
        path = Path(DEFAULT_FILE) if Path(DEFAULT_FILE).is_file() else None
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded or {}
    data = apply_env_overrides(data, env)
    try:
        config = ApplianceConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, ApplianceConfig)) from None
    config._base_dir = path.resolve().parent if path is not None else Path.cwd()
    return config
