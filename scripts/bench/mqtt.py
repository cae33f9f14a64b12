"""Overhead of the MQTT path and the rate of ``busy`` answers, on loopback.

Overhead = publish-to-reply time seen by a client minus the engine's own time for the job
(``data.ms``: from submission to the final event). The busy rate is measured with one long job
running and a queue of one, so every further request is refused at once.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.app import Appliance  # noqa: E402
from appliance.config import load_config  # noqa: E402
from appliance.demo_model import ensure_demo_model  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"
        "set_tcp_nodelay true\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


class Replies:
    def __init__(self, port: int, topic: str) -> None:
        self.cond = threading.Condition()
        self.items: dict[str, tuple[float, dict]] = {}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, qos=1)
        done.wait(5)

    def _on_message(self, client, userdata, msg) -> None:  # type: ignore[no-untyped-def]
        body = json.loads(msg.payload)
        with self.cond:
            self.items[str(body["id"])] = (time.perf_counter(), body)
            self.cond.notify_all()

    def wait_for(self, rid: str, timeout: float = 60) -> tuple[float, dict]:
        with self.cond:
            self.cond.wait_for(lambda: rid in self.items, timeout)
            return self.items[rid]


def make_app(folder: Path, port: int, bundle: Path, **engine: int) -> Appliance:
    cfg = folder / f"cfg-{len(list(folder.glob('cfg-*')))}.yaml"
    cfg.write_text(
        json.dumps(
            {
                "mqtt": {"port": port, "base_topic": f"bench{len(list(folder.glob('cfg-*')))}"},
                "http": {"enabled": False},
                "engine": engine,
                "models": [{"id": "demo", "path": str(bundle), "runtime": "onnx"}],
            }
        )
    )
    app = Appliance(load_config(cfg, env={}))
    app.start()
    for worker in app.engine.workers:
        worker.loaded.wait(120)
    app.link.subscribed.wait(10)
    time.sleep(0.5)
    return app


def overhead(folder: Path, port: int, bundle: Path, n: int) -> list[float]:
    app = make_app(folder, port, bundle, queue_max=8, max_active=1)
    base = app.topics.base
    replies = Replies(port, f"{base}/response/chat")
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sender.connect("127.0.0.1", port)
    sender.loop_start()
    out = []
    for i in range(n + 3):
        payload = json.dumps({"id": f"o{i}", "prompt": "Hi", "max_tokens": 1, "temperature": 0})
        sent = time.perf_counter()
        sender.publish(f"{base}/request/chat", payload, qos=1)
        got, body = replies.wait_for(f"o{i}")
        if i >= 3:  # warm-up
            out.append((got - sent) * 1e3 - body["data"]["ms"])
    app.stop()
    return out


def busy_rate(folder: Path, port: int, bundle: Path, n: int) -> tuple[float, int]:
    app = make_app(folder, port, bundle, queue_max=1, max_active=1)
    base = app.topics.base
    replies = Replies(port, f"{base}/response/chat")
    sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sender.max_inflight_messages_set(1000)
    sender.connect("127.0.0.1", port)
    sender.loop_start()
    long = {"prompt": "Tell a long story.", "max_tokens": 2000, "temperature": 0.8}
    for rid in ("run", "wait"):
        sender.publish(f"{base}/request/chat", json.dumps({"id": rid, **long}), qos=1)
    time.sleep(1.0)
    started = time.perf_counter()
    for i in range(n):
        sender.publish(f"{base}/request/chat", json.dumps({"id": f"b{i}", "prompt": "Hi"}), qos=1)
    last, _ = replies.wait_for(f"b{n - 1}", 120)
    busy = sum(1 for k, (_, b) in replies.items.items() if k.startswith("b") and b["error"]["code"] == "busy")
    app.stop()
    return n / (last - started), busy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--flood", type=int, default=2000)
    args = parser.parse_args()
    bundle = ensure_demo_model(ROOT / "models")
    with tempfile.TemporaryDirectory() as tmp:
        broker, port = start_broker(Path(tmp))
        try:
            over = sorted(overhead(Path(tmp), port, bundle, args.requests))
            rate, busy = busy_rate(Path(tmp), port, bundle, args.flood)
        finally:
            broker.terminate()
    p99 = over[min(len(over) - 1, int(0.99 * len(over)))]
    print(
        f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"python {platform.python_version()}"
    )
    print("| figure | value |")
    print("|---|---|")
    print(f"| MQTT path overhead, median ({len(over)} requests) | {statistics.median(over):.2f} ms |")
    print(f"| MQTT path overhead, p99 | {p99:.2f} ms |")
    print(f"| busy answers with a full queue ({busy}/{args.flood} refused) | {rate:.0f} requests/s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
