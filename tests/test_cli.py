"""The command line's wiring: help, check, and the one-line errors of chat and convert (fast tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """``python -m appliance ...`` in a subprocess, without the caller's APPLIANCE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def fake_bundle(folder: Path) -> Path:
    """An NPU bundle's files (their contents are not read on a host without the card)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 1}), encoding="utf-8")
    for name in ("llama_p128_l0_together.axmodel", "llama_post.axmodel"):
        (folder / name).write_bytes(b"")
    return folder


@pytest.fixture(autouse=True)
def _no_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("APPLIANCE_"):
            monkeypatch.delenv(name)


def test_module_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("run", "chat", "models", "check"):
        assert command in result.stdout


@pytest.mark.parametrize("argv", [["chat", "--help"], ["models", "demo", "-h"], ["models", "convert", "-h"]])
def test_subcommand_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 0
    assert "usage: appliance" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["chat", "--model", "x", "--temperature", "warm", "hi"]) == 2
    assert "invalid float value" in capsys.readouterr().err


def test_check_good_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake_bundle(tmp_path / "models" / "m")
    path = write_config(tmp_path, {"mqtt": {"port": 1884}, "models": [{"id": "m", "path": "models/m"}]})
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "127.0.0.1:1884" in out
    assert f"m (chat, runtime auto): {tmp_path / 'models' / 'm'}: ok" in out


def test_check_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, {"mqtt": {"prot": 5, "port": 99999}})
    assert main(["check", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    assert "mqtt.prot: unknown key; allowed: host, port" in err
    assert "mqtt.port: Input should be less than or equal to 65535" in err


def test_check_missing_model_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "not-a-bundle").mkdir()
    path = write_config(
        tmp_path,
        {"models": [{"id": "gone", "path": "models/gone"}, {"id": "empty", "path": "not-a-bundle"}]},
    )
    assert main(["check", "--log-level", "warning", "-c", str(path)]) == 1
    out = capsys.readouterr().out
    assert "gone" in out and "MISSING" in out
    assert "empty" in out and "NOT A BUNDLE" in out


def test_check_missing_explicit_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-c", str(tmp_path / "nope.yaml")]) == 1
    assert "not found" in capsys.readouterr().err


def test_check_in_a_subprocess(tmp_path: Path) -> None:
    good = write_config(tmp_path, {"models": [{"id": "m", "path": str(fake_bundle(tmp_path / "m"))}]})
    assert run_cli("check", "-c", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("device:\n  backend: gpu\n", encoding="utf-8")
    result = run_cli("check", "-c", str(bad))
    assert result.returncode == 1
    assert "device.backend: 'gpu' is not allowed; allowed: auto, axcl, smi, host, sim" in result.stderr


def test_chat_missing_bundle_is_one_line_exit_2(tmp_path: Path) -> None:
    result = run_cli("chat", "--model", str(tmp_path / "nonexistent"), "x")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("appliance chat: ") and "nonexistent" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_chat_bad_parameter_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["chat", "--model", str(tmp_path), "--temperature", "5", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "appliance chat: temperature must be from 0 (greedy) to 2"



def test_chat_refuses_a_prompt_too_long_before_loading_the_model(  # type: ignore[no-untyped-def]
    tiny_bundles, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from appliance import prompt_size
    from npu.llm.runner import LLMRunner

    bundle = tiny_bundles["qwen2"][1]
    limit = prompt_size.prompt_token_limit(bundle, "onnx")

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for a prompt that cannot fit")

    monkeypatch.setattr(LLMRunner, "load", no_load)
    assert main(["chat", "--model", str(bundle), "--backend", "onnx", "word " * (limit + 10)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("appliance chat: the prompt has ") and f"the {limit} prompt tokens" in err, err

    def no_tokenizer(*args: object, **kwargs: object) -> None:
        raise AssertionError("a prompt longer than any that fits was tokenized")

    monkeypatch.setattr(prompt_size, "PromptEncoder", no_tokenizer)
    huge = "x" * (prompt_size.max_prompt_chars(limit) + 1)
    assert main(["chat", "--model", str(bundle), "--backend", "onnx", huge]) == 2
    assert "characters" in capsys.readouterr().err

    def loaded(*args: object, **kwargs: object) -> None:
        raise RuntimeError("load reached")

    monkeypatch.undo()
    monkeypatch.setattr(LLMRunner, "load", loaded)
    assert main(["chat", "--model", str(bundle), "--backend", "onnx", "Hi"]) == 2
    assert capsys.readouterr().err.strip() == "appliance chat: load reached", "a prompt that fits loads"

def test_convert_needs_force_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = fake_bundle(tmp_path / "bundle")
    assert main(["models", "convert", str(tmp_path / "x.gguf"), str(dest)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_check_refuses_models_that_do_not_fit_the_cards_cmm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = fake_bundle(tmp_path / "models" / "big")
    (bundle / "llama_p128_l0_together.axmodel").write_bytes(b"\0" * (3 * 2**20))  # 3 MiB of "weights"
    models = [{"id": "big", "path": "models/big"}]
    small_card = {"backend": "sim", "sim": {"cmm_total_mib": 514, "cmm_used_mib": 0}}
    path = write_config(tmp_path, {"device": small_card, "models": models})
    assert main(["check", "-c", str(path)]) == 1
    captured = capsys.readouterr()
    assert "device 0 (sim): models need about 3 MiB" in captured.out and "DOES NOT FIT" in captured.out
    assert "do not fit" in captured.err
    roomy = write_config(tmp_path, {"device": {"backend": "sim"}, "models": models})
    assert main(["check", "-c", str(roomy)]) == 0
    assert "of 7040 MiB" in capsys.readouterr().out


def test_cmm_plan() -> None:
    from npu.device.cmm_plan import CmmPlan

    plan = CmmPlan({"llm": 4900.0, "sd": 2100.0}, total_mib=7040.0, free_mib=7000.0)
    assert plan.need_mib == 7000.0 and plan.fits is False and "DOES NOT FIT" in plan.describe()
    assert CmmPlan({"llm": 3000.0}, 7040.0, None).fits is True
    assert CmmPlan({"llm": 3000.0}, None, None).fits is None


def test_scheduler_chatter_stays_out_of_the_log_unless_debugging(tmp_path: Path) -> None:
    import logging

    runs = logging.getLogger("apscheduler.executors.default")  # "Running job ..." every 2 s
    try:
        main(["check", "-c", str(tmp_path / "none.yaml")])
        assert not runs.isEnabledFor(logging.INFO) and runs.isEnabledFor(logging.WARNING)
        main(["--log-level", "DEBUG", "check", "-c", str(tmp_path / "none.yaml")])
        assert runs.isEnabledFor(logging.DEBUG)
    finally:
        logging.getLogger("apscheduler").setLevel(logging.NOTSET)


def test_check_reads_the_gate_files_run_reads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from prometheus_client import CollectorRegistry

    from appliance.config import ConfigError, load_config
    from appliance.gate import make_gate

    fake_bundle(tmp_path / "models" / "m")
    moderation = {"enabled": True, "blocklist": "blocked.txt", "curtain": "curtain.png",  # OPERATIONS.md
                  "displays": {"kids-room": {"blocklist": "kids.txt", "judge": True},
                               "artist-studio": {"enabled": False}}}
    path = write_config(tmp_path, {"models": [{"id": "m", "path": "models/m"}], "moderation": moderation})
    (tmp_path / "blocked.txt").write_text("badword\n")
    messages = []
    for missing in ("kids.txt", "curtain.png"):
        assert main(["check", "-c", str(path)]) == 1, f"{missing} is missing"
        err = capsys.readouterr().err
        with pytest.raises(ConfigError) as run:  # what `appliance run` says at its start
            make_gate(load_config(path), lambda *a, **k: None, CollectorRegistry())
        assert str(run.value) in err and missing in err, err
        messages.append(err)
        if missing == "kids.txt":
            (tmp_path / "kids.txt").write_text("scary # a comment\n")
    assert "moderation: cannot read the blocklist" in messages[0]
    assert "moderation: cannot read the curtain" in messages[1]
    (tmp_path / "curtain.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "moderation on: blocklist" in out and "(1 words or phrases)" in out, out


def test_help_says_run_serves_http_and_the_demo_shows_the_console(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    run_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("run "))
    assert "MQTT" in run_line and "HTTP" in run_line, run_line
    root = Path(__file__).resolve().parents[1]
    script = "source scripts/lib/demo_instructions.sh; demo_instructions 1999 8123"
    printed = subprocess.run(["bash", "-c", script], cwd=root, capture_output=True, text=True,
                             check=True).stdout
    assert "console" in printed and "http://127.0.0.1:8123/ " in printed, printed
    assert "mosquitto_pub -p 1999" in printed
