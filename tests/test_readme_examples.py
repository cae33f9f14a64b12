"""The README's examples, run as printed against a started appliance, so they cannot drift.

Every fenced ``sh`` block that uses mosquitto_pub, mosquitto_sub or curl and the ``python`` block
of the openai client are taken from README.md; only the broker's port and the bridge's port are
put in (the README's are 1883 and 8000). Each prompt must be answered.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
TOOLS = re.compile(r"^\s*(mosquitto_pub|mosquitto_sub|curl)\b", re.M)
BASE = "appliance"  # the README's base topic, the default one
MODEL = "smollm2-135m-instruct"  # the model id the README's openai example names


def fenced(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README) if lang == language]


SH_BLOCKS = [block for block in fenced("sh") if TOOLS.search(block)]
OPENAI_BLOCKS = [block for block in fenced("python") if "from openai import" in block]


def commands(block: str) -> list[str]:
    """The block's commands, continuation lines joined, comment and blank lines left out."""
    joined = re.sub(r"\\\n", "", block)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.fixture(scope="module")
def appliance(  # type: ignore[no-untyped-def]
    mqtt_broker, tmp_path_factory: pytest.TempPathFactory, demo_bundle_fp32: Path,
) -> Iterator[Appliance]:
    folder = tmp_path_factory.mktemp("readme")
    path = write_config(
        folder, mqtt_broker.port, BASE, demo_bundle_fp32,
        models=[{"id": MODEL, "kind": "chat", "path": str(demo_bundle_fp32), "runtime": "onnx"}],
        http={"enabled": True, "host": "127.0.0.1", "port": 0},
        device={"backend": "sim", "health_interval": 60},  # the sim examples steer a simulated card
    )
    app = Appliance(load_config(path, env={}))
    app.start()
    try:
        assert app.engine.workers[0].loaded.wait(60) and app.link.subscribed.wait(10)
        assert app.http is not None
        yield app
    finally:
        app.stop()


def localise(command: str, mqtt_port: int, http_port: int) -> str:
    command = re.sub(r"\b(mosquitto_(?:pub|sub))\b", rf"\1 -p {mqtt_port}", command)
    return command.replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def printed_ids(out: Path) -> set[str]:
    """The ids of the answers ``mosquitto_sub -v`` printed (one ``topic payload`` per line)."""
    ids = set()
    for line in out.read_text(errors="replace").splitlines():
        topic, _, payload = line.partition(" ")
        if topic.startswith(f"{BASE}/response/") and payload.startswith("{"):
            ids.add(str(json.loads(payload).get("id")))
    return ids


def test_the_readme_still_has_its_examples() -> None:
    assert len(SH_BLOCKS) >= 3 and len(OPENAI_BLOCKS) == 1
    assert any("mosquitto_sub" in b for b in SH_BLOCKS) and any("curl" in b for b in SH_BLOCKS)


@pytest.mark.parametrize("block", SH_BLOCKS, ids=[f"sh{i}" for i in range(len(SH_BLOCKS))])
def test_each_shell_example_is_answered(  # type: ignore[no-untyped-def]
    block: str, appliance: Appliance, mqtt_broker, tmp_path: Path,
) -> None:
    assert appliance.http is not None
    ports = (mqtt_broker.port, appliance.http.bound_port)
    observer = Client(mqtt_broker.port)
    observer.subscribe(f"{BASE}/response/#")
    background: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        asked: Counter[str] = Counter()
        for i, command in enumerate(commands(block)):
            line = localise(command, *ports)
            assert TOOLS.match(line), f"an example the test cannot run: {command}"
            if line.rstrip().endswith("&"):  # a subscriber the example leaves running
                out = tmp_path / f"background-{i}.txt"
                with out.open("wb") as sink:
                    proc = subprocess.Popen(["bash", "-c", line.rstrip().rstrip("&")], stdout=sink,
                                            stderr=subprocess.STDOUT, start_new_session=True)
                background.append((proc, out))

                def heard(out: Path = out) -> bool:
                    observer.publish(f"{BASE}/response/probe", "probe")
                    return f"{BASE}/response/probe" in out.read_text(errors="replace")

                wait_for(heard, 10, f"the example's subscriber never subscribed: {command}")
                continue
            done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (command, done.stderr)
            if line.startswith("curl"):
                body = json.loads(done.stdout)
                assert "error" not in body and (body.get("choices") or body.get("status") == "ok"), body
            elif line.startswith("mosquitto_pub"):
                topic = re.search(r"-t\s+'?([^'\s]+)", line)
                assert topic and topic.group(1).startswith(f"{BASE}/request/"), command
                asked[topic.group(1).removeprefix(f"{BASE}/request/")] += 1

        def answers(op: str) -> list[dict[str, object]]:
            return observer.json(f"{BASE}/response/{op}")

        for op, count in asked.items():
            wait_for(lambda op=op, count=count: len(answers(op)) >= count, 120, f"no answer on {op}")
            assert [a["status"] for a in answers(op)] == ["ok"] * count, answers(op)
        wanted = {str(a["id"]) for op in asked for a in answers(op)}
        for _, out in background:  # what the example's own subscriber shows a person
            wait_for(lambda out=out: wanted <= printed_ids(out), 10,
                     f"the example's subscriber did not print every answer: {out.read_text()[-2000:]}")
    finally:
        for proc, _ in background:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        observer.close()


def test_the_openai_example_is_answered(appliance: Appliance) -> None:
    assert appliance.http is not None
    (code,) = OPENAI_BLOCKS
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{appliance.http.bound_port}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the example prints the answer"


def test_the_openai_example_needs_only_the_default_install() -> None:
    """``.venv/bin/python`` runs it after ./scripts/demo, which installs no extras."""
    (code,) = OPENAI_BLOCKS
    imported = set(re.findall(r"^(?:from|import)\s+(\w+)", code, re.M))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = {re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower() for req in project["dependencies"]}
    assert imported and imported <= installed, (imported, installed)
