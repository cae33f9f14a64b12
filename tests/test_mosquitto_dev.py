"""The development broker as shipped (mosquitto/dev.conf, which ./scripts/demo runs): a prompt sent
with mosquitto_pub's default QoS 0 while the appliance is away waits for it and is answered."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mqtt_broker import MOSQUITTO, free_port, port_open
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import ApplianceConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dev_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``mosquitto -c mosquitto/dev.conf`` on a free port, as scripts/demo starts it."""
    folder = tmp_path_factory.mktemp("dev-broker")
    port = free_port()
    conf = folder / "dev.conf"
    conf.write_text((ROOT / "mosquitto/dev.conf").read_text().replace("listener 1883 ", f"listener {port} "))
    with (folder / "mosquitto.log").open("wb") as log:
        proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while not port_open(port):
        assert proc.poll() is None and time.monotonic() < deadline, (folder / "mosquitto.log").read_text()
        time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(10)


def started(config: ApplianceConfig) -> Appliance:
    app = Appliance(config)
    app.start()
    assert app.engine.workers[0].loaded.wait(60) and app.link.subscribed.wait(10)
    return app


def test_a_qos0_prompt_sent_while_the_appliance_restarts_is_answered(  # type: ignore[no-untyped-def]
    dev_broker: int, tmp_path: Path, demo_bundle_fp32: Path,
) -> None:
    base = "t_dev_qos0"
    config = load_config(write_config(tmp_path, dev_broker, base, demo_bundle_fp32), env={})
    listener = Client(dev_broker)
    try:
        listener.subscribe(f"{base}/response/chat")
        started(config).stop()  # its persistent session stays at the broker
        prompt = json.dumps({"id": "while-away", "prompt": "Hello?", "max_tokens": 8, "temperature": 0})
        subprocess.run(["mosquitto_pub", "-p", str(dev_broker), "-t", f"{base}/request/chat", "-m", prompt],
                       check=True, timeout=10)  # mosquitto_pub's default QoS: 0
        time.sleep(0.3)
        assert listener.json(f"{base}/response/chat") == []
        app = started(config)
        try:
            listener.wait(lambda: bool(listener.json(f"{base}/response/chat")), 30)
            (reply,) = listener.json(f"{base}/response/chat")
            assert reply["id"] == "while-away" and reply["status"] == "ok"
        finally:
            app.stop()
    finally:
        listener.close()
