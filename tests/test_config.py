"""The config schema: defaults, the shipped appliance.yaml, error messages, environment overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.config import ApplianceConfig, ConfigError, apply_env_overrides, load_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: Any, name: str = "appliance.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def problems(tmp_path: Path, data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, data), env=env or {})
    return str(info.value)


# --- defaults and the shipped file -------------------------------------------------------------
def test_defaults_are_valid_and_are_the_demo() -> None:
    config = ApplianceConfig()
    assert (config.mqtt.host, config.mqtt.port, config.mqtt.base_topic) == ("127.0.0.1", 1883, "appliance")
    assert config.mqtt.client_id == "appliance-appliance"
    assert config.mqtt.protocol == 5
    assert (config.http.enabled, config.http.host, config.http.port) == (True, "0.0.0.0", 8000)
    assert (config.device.backend, config.device.ids) == ("auto", [0])
    assert (config.engine.queue_max, config.engine.request_timeout) == (32, 120)
    assert config.telemetry.interval == 10
    assert [(m.id, m.kind, m.path, m.runtime) for m in config.models] == [
        ("smollm2-135m-instruct", "chat", "models/smollm2-135m-instruct", "auto"),
        ("joe-us-medium", "tts", "models/joe-us-medium", "auto"),
        ("whisper-tiny-en", "stt", "models/whisper-tiny-en", "auto")
    ]


def test_raw_prompt_special_tokens_are_off_unless_switched_on(tmp_path: Path) -> None:
    assert ApplianceConfig().http.raw_prompt_special_tokens is False
    path = write(tmp_path, {"http": {"raw_prompt_special_tokens": True}})
    assert load_config(path, env={}).http.raw_prompt_special_tokens is True
    env = {"APPLIANCE_HTTP_RAW_PROMPT_SPECIAL_TOKENS": "true"}
    assert load_config(None, env=env).http.raw_prompt_special_tokens is True


def test_no_file_means_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None, env={})
    assert config.model_dump() == ApplianceConfig().model_dump()
    assert config.base_dir == tmp_path


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml", env={})


def test_shipped_appliance_yaml_is_valid_and_equals_the_defaults() -> None:
    config = load_config(ROOT / "appliance.yaml", env={})
    assert config.model_dump() == ApplianceConfig().model_dump()
    assert config.model_path(config.models[0]) == ROOT / "models" / "smollm2-135m-instruct"


def test_empty_file_and_empty_section_mean_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, ""), env={}).mqtt.port == 1883
    assert load_config(write(tmp_path, "mqtt:\n  # port: 1884\nhttp:\n"), env={}).mqtt.port == 1883


@pytest.mark.parametrize(
    ("text", "expected"),
    [("mqtt: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "top level must be a mapping")],
)
def test_unreadable_files(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems(tmp_path, text)


# --- error messages ----------------------------------------------------------------------------
def test_typo_names_the_key_and_the_allowed_ones(tmp_path: Path) -> None:
    message = problems(tmp_path, {"mqtt": {"prot": 5}})
    assert "mqtt.prot: unknown key; allowed: host, port, base_topic, client_id, protocol" in message


def test_typo_in_nested_and_list_sections(tmp_path: Path) -> None:
    message = problems(
        tmp_path,
        {"mqtt": {"tls": {"enable": True}}, "models": [{"id": "a", "path": "a", "preloaded": False}]},
    )
    assert "mqtt.tls.enable: unknown key; allowed: enabled, ca_certs, certfile, keyfile, insecure" in message
    assert "models[0].preloaded: unknown key; allowed: id, kind, path, runtime, preload, default" in message


def test_unknown_section(tmp_path: Path) -> None:
    message = problems(tmp_path, {"mqttt": {"port": 1}})
    allowed = ("mqtt, http, device, engine, telemetry, images, homeassistant, voice, journal, moderation, "
               "models")
    assert f"mqttt: unknown section; allowed: {allowed}" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"mqtt": {"port": 70000}}, "mqtt.port: Input should be less than or equal to 65535 (got 70000)"),
        ({"engine": {"queue_max": 0}}, "engine.queue_max: Input should be greater than or equal to 1"),
        ({"telemetry": {"interval": 0.5}}, "telemetry.interval:"),
        ({"http": {"max_n": 100}}, "http.max_n:"),
        ({"device": {"ids": []}}, "device.ids:"),
        ({"device": {"ids": [0, -1]}}, "device.ids[1]: Input should be greater than or equal to 0"),
        ({"engine": {"step_timeout": "soon"}}, "engine.step_timeout: Input should be a valid number"),
    ],
)
def test_out_of_range_values_name_the_key(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert expected in problems(tmp_path, data)


def test_every_problem_is_listed(tmp_path: Path) -> None:
    message = problems(tmp_path, {"mqtt": {"port": 0, "keepalive": 1}, "http": {"port": -1}})
    assert "mqtt.port:" in message and "mqtt.keepalive:" in message and "http.port:" in message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"device": {"backend": "npu"}},
            "device.backend: 'npu' is not allowed; allowed: auto, axcl, smi, host, sim",
        ),
        ({"mqtt": {"protocol": 4}}, "mqtt.protocol: 4 is not allowed; allowed: 5, 311"),
        (
            {"models": [{"id": "a", "path": "a", "runtime": "gpu"}]},
            "models[0].runtime: 'gpu' is not allowed; allowed: auto, axcl, axengine, onnx",
        ),
        ({"models": [{"id": "a", "path": "a", "kind": "video"}]}, "allowed: chat, image"),
    ],
)
def test_literal_choices_are_listed(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    assert expected in problems(tmp_path, data)


def test_config_error_keeps_one_line_per_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, {"mqtt": {"port": 0}, "http": {"port": 70000}}), env={})
    assert [p.split(":")[0] for p in info.value.problems] == ["mqtt.port", "http.port"]


# --- rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["a/#", "a/+/b", "#", "/appliance", "appliance/", "a//b", "$SYS/x"])
def test_base_topic_must_be_plain_levels(tmp_path: Path, base: str) -> None:
    assert "mqtt.base_topic:" in problems(tmp_path, {"mqtt": {"base_topic": base}})


def test_multi_level_base_topic_and_derived_client_id() -> None:
    config = ApplianceConfig.model_validate({"mqtt": {"base_topic": "gallery/room1"}})
    assert config.mqtt.client_id == "appliance-gallery-room1"
    fixed = ApplianceConfig.model_validate({"mqtt": {"base_topic": "x", "client_id": "pi-7"}})
    assert fixed.mqtt.client_id == "pi-7"


@pytest.mark.parametrize("group", ["a/b", "a+", "#", ""])
def test_shared_group_is_one_plain_level(tmp_path: Path, group: str) -> None:
    assert "mqtt.shared_group:" in problems(tmp_path, {"mqtt": {"shared_group": group}})


def test_tls_keyfile_needs_certfile(tmp_path: Path) -> None:
    assert "mqtt.tls: keyfile is set but certfile is not" in problems(
        tmp_path, {"mqtt": {"tls": {"enabled": True, "keyfile": "k.pem"}}}
    )


def test_duplicate_model_ids_are_rejected(tmp_path: Path) -> None:
    message = problems(tmp_path, {"models": [{"id": "a", "path": "x"}, {"id": "a", "path": "y"}]})
    assert "models: model ids must be unique; repeated: a" in message


def test_one_default_model_per_kind(tmp_path: Path) -> None:
    models = [{"id": "a", "path": "x", "default": True}, {"id": "b", "path": "y", "default": True}]
    assert "only one chat model may be the default" in problems(tmp_path, {"models": models})


@pytest.mark.parametrize("model_id", ["has space", "a/b", "", "ü"])
def test_model_id_pattern(tmp_path: Path, model_id: str) -> None:
    assert "models[0].id:" in problems(tmp_path, {"models": [{"id": model_id, "path": "x"}]})


def test_device_ids_unique(tmp_path: Path) -> None:
    assert "device.ids: device ids must be unique" in problems(tmp_path, {"device": {"ids": [0, 1, 0]}})


def test_model_entry_needs_id_and_path(tmp_path: Path) -> None:
    message = problems(tmp_path, {"models": [{"kind": "chat"}]})
    assert "models[0].id: required" in message and "models[0].path: required" in message


# --- model paths -------------------------------------------------------------------------------
def test_relative_model_path_is_relative_to_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    absolute = tmp_path / "abs" / "bundle"
    path = write(
        conf_dir,
        {"models": [{"id": "rel", "path": "models/m"}, {"id": "abs", "path": str(absolute)}]},
    )
    config = load_config(path, env={})
    assert config.models[0].path == "models/m"  # the raw value is kept
    assert config.model_path(config.models[0]) == conf_dir.resolve() / "models" / "m"
    assert config.model_path(config.models[1]) == absolute


# --- environment overrides ---------------------------------------------------------------------
def test_env_overrides_parse_yaml_scalars(tmp_path: Path) -> None:
    path = write(tmp_path, {"mqtt": {"port": 1883, "tls": {"ca_certs": "/ca.pem"}}})
    config = load_config(
        path,
        env={
            "APPLIANCE_MQTT_PORT": "1884",
            "APPLIANCE_MQTT_TLS_ENABLED": "true",
            "APPLIANCE_HTTP_ENABLED": "false",
            "APPLIANCE_DEVICE_IDS": "[0, 1]",
            "APPLIANCE_ENGINE_REQUEST_TIMEOUT": "30.5",
            "APPLIANCE_MQTT_PROTOCOL": "311",
            "HOME": "/root",  # not ours: ignored
        },
    )
    assert config.mqtt.port == 1884
    assert config.mqtt.tls.enabled is True
    assert config.mqtt.tls.ca_certs == "/ca.pem"  # the file's other nested keys survive
    assert config.http.enabled is False
    assert config.device.ids == [0, 1]
    assert config.engine.request_timeout == 30.5
    assert config.mqtt.protocol == 311


def test_env_text_fields_stay_text() -> None:
    config = load_config(
        None,
        env={
            "APPLIANCE_HTTP_API_KEY": "0123",
            "APPLIANCE_MQTT_PASSWORD": "yes",
            "APPLIANCE_MQTT_BASE_TOPIC": "gallery/room1",
        },
    )
    assert config.http.api_key == "0123"
    assert config.mqtt.password == "yes"
    assert config.mqtt.base_topic == "gallery/room1"


def test_env_empty_value_clears_an_optional_key(tmp_path: Path) -> None:
    path = write(tmp_path, {"http": {"api_key": "from-the-file"}})
    assert load_config(path, env={"APPLIANCE_HTTP_API_KEY": ""}).http.api_key is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("APPLIANCE_MQTT_PROT", "APPLIANCE_MQTT_PROT: mqtt has no key 'prot'; allowed: host, port"),
        ("APPLIANCE_MQTT_TLS_ENABLE", "APPLIANCE_MQTT_TLS_ENABLE: mqtt.tls has no key 'enable'; allowed: en"),
        ("APPLIANCE_MQTT_PORT_X", "APPLIANCE_MQTT_PORT_X: mqtt has no key 'port_x'"),
        ("APPLIANCE_MQQT_PORT", "APPLIANCE_MQQT_PORT: unknown section 'mqqt'"),
        ("APPLIANCE_MQTT", "APPLIANCE_MQTT: unknown section"),
        ("APPLIANCE_MODELS_PATH", "APPLIANCE_MODELS_PATH: models is a list"),
    ],
)
def test_bad_env_override_names_it(name: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={name: "1"})
    assert expected in str(info.value)


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    message = problems(tmp_path, {}, env={"APPLIANCE_MQTT_PORT": "99999"})
    assert "mqtt.port (from APPLIANCE_MQTT_PORT): Input should be less than or equal to 65535" in message


def test_apply_env_overrides_does_not_modify_its_input() -> None:
    data = {"mqtt": {"tls": {"enabled": False}}}
    merged, sources = apply_env_overrides(data, {"APPLIANCE_MQTT_TLS_ENABLED": "true"})
    assert data == {"mqtt": {"tls": {"enabled": False}}}
    assert merged == {"mqtt": {"tls": {"enabled": True}}}
    assert sources == {("mqtt", "tls", "enabled"): "APPLIANCE_MQTT_TLS_ENABLED"}
