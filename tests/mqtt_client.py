"""Test helpers for the appliance end to end: an MQTT client that records, a config writer."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties


class Client:
    """A test MQTT client that records every message per topic."""

    def __init__(self, port: int, *, v5: bool = True, client_id: str = "") -> None:
        protocol = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        self.messages: dict[str, list[mqtt.MQTTMessage]] = defaultdict(list)
        self.cond = threading.Condition()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=10)
        self.c.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages[msg.topic].append(msg)
            self.cond.notify_all()

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(t, 1) for t in topics])
        assert done.wait(5)

    def publish(self, topic: str, payload: Any, properties: Properties | None = None) -> None:
        body = json.dumps(payload) if isinstance(payload, dict) else payload
        self.c.publish(topic, body, qos=1, properties=properties).wait_for_publish(5)

    def wait(self, predicate: Callable[[], bool], timeout: float = 60) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "timed out waiting for MQTT messages"

    def json(self, topic: str) -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(m.payload) for m in self.messages[topic]]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def write_config(tmp: Path, port: int, base: str, bundle: Path, **over: Any) -> Path:
    data: dict[str, Any] = {
        "mqtt": {"port": port, "base_topic": base, "keepalive": 5},
        "http": {"enabled": False},
        "engine": {"queue_max": 8, "max_active": 2},
        "models": [{"id": "demo", "kind": "chat", "path": str(bundle), "runtime": "onnx"}],
    }
    for section, values in over.items():
        if isinstance(values, list):
            data[section] = values
        else:
            data.setdefault(section, {}).update(values)
    path = tmp / f"appliance-{len(list(tmp.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path
