"""Nothing accepted is lost: a burst of QoS 1 prompts, ``kill -9`` and broker restarts in the middle.

A real appliance process (``appliance run``), a real Mosquitto with persistence (as
mosquitto/production.conf has it) and a persistent test client that sends N prompts with ids in its
own name. Every id must be answered after the restart, and nothing generated twice: a reply is
byte-identical every time it arrives (the ``ms`` it carries differs between two generations). A
request first answered after the disruption arrives exactly once; only a reply that was on its way
at the kill (it reached the broker, whose acknowledgement the appliance never saw) may arrive once
more, as MQTT's QoS 1 allows.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_broker import MosquittoBroker
from mqtt_client import write_config
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

N = 40
SENDER = "tester"
BASE = "crash"


class Prompter:
    """A persistent MQTT 5 client: replies sent while it is away wait for it at the broker."""

    def __init__(self, port: int) -> None:
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="crash-tester", protocol=mqtt.MQTTv5)
        self.replies: dict[str, list[bytes]] = defaultdict(list)
        self.status: list[str] = []
        self.cond = threading.Condition()
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(f"replies/{SENDER}/chat", 1), (f"{BASE}/status", 1)])
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self.c.reconnect_delay_set(0, 1)
        self.c.connect("127.0.0.1", port, keepalive=5, clean_start=False, properties=props)
        self.c.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            if msg.topic.endswith("/status"):
                self.status.append(msg.payload.decode())
            else:
                self.replies[json.loads(msg.payload)["id"]].append(bytes(msg.payload))
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"timed out waiting for {what}"

    def answered(self) -> int:
        with self.cond:
            return len(self.replies)

    def ask(self, ids: list[str]) -> None:
        for rid in ids:
            body = {"id": rid, "prompt": f"Say something about the number {rid}.", "max_tokens": 12,
                    "temperature": 0}
            self.c.publish(f"{BASE}/request/chat/{SENDER}", json.dumps(body), qos=1)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class ApplianceProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "appliance", "run", "-c", str(self.config)],
                                     stdout=out, stderr=out, env=env)
        out.close()

    def kill9(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


Rig = tuple[MosquittoBroker, "ApplianceProcess", Prompter]


@pytest.fixture
def rig(tmp_path: Path, tiny_bundles: dict[str, tuple[Path, Path]]) -> Iterator[Rig]:
    broker = MosquittoBroker(tmp_path / "broker", persistent=True).start()
    config = write_config(tmp_path, broker.port, BASE, tiny_bundles["llama"][1],
                          engine={"queue_max": 64, "max_active": 2})
    app = ApplianceProcess(config, tmp_path / "appliance.log")
    tester = Prompter(broker.port)
    app.start()
    # Its first connection creates the appliance's persistent session; from then on nothing is
    # dropped. Until its subscription stands, a prompt is dropped by the broker: probe until answered.
    tester.wait(lambda: "online" in tester.status, 60, "the appliance to come online")
    for k in range(100):
        tester.ask([f"probe-{k}"])
        with tester.cond:
            if tester.cond.wait_for(lambda: bool(tester.replies), 0.5):
                break
    time.sleep(0.5)
    with tester.cond:
        tester.replies.clear()
    try:
        yield broker, app, tester
    finally:
        tester.close()
        app.stop()
        broker.stop()


def check_every_id_answered_once(tester: Prompter, ids: list[str], before: set[str], log: Path) -> int:
    """Every id answered, none generated twice; returns how many replies came a second time."""
    tester.wait(lambda: set(tester.replies) >= set(ids), 120,
                f"every id to be answered (log: {log.read_text()[-3000:]})")
    time.sleep(1.5)  # anything sent twice would arrive by now
    with tester.cond:
        replies = {k: list(v) for k, v in tester.replies.items()}
    assert set(replies) == set(ids)
    assert [rid for rid, copies in replies.items() if len(set(copies)) > 1] == [], "generated twice"
    assert [rid for rid, copies in replies.items() if rid not in before and len(copies) > 1] == []
    for copies in replies.values():
        assert json.loads(copies[0])["status"] == "ok", copies[0]
    return sum(1 for v in replies.values() if len(v) > 1)


def answered(tester: Prompter) -> set[str]:
    with tester.cond:
        return set(tester.replies)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_in_the_middle_of_a_burst_loses_nothing(rig: Rig, seed: int) -> None:
    _, app, tester = rig
    rng = random.Random(seed)
    ids = [f"r{seed}-{i}" for i in range(N)]
    tester.ask(ids)
    k = rng.randint(1, N // 2)  # after the k-th answer, at a random moment before the next ones
    tester.wait(lambda: tester.answered() >= k, 60, f"{k} answers")
    time.sleep(rng.uniform(0.0, 0.03))
    app.kill9()
    before = answered(tester)
    app.start()
    resent = check_every_id_answered_once(tester, ids, before, app.log)
    assert len(before) < N, "the kill came after the burst: nothing was tested"
    print(f"kill -9 (seed {seed}): {len(before)}/{N} answered before, {N - len(before)} after the restart, "
          f"{resent} reply sent again")


def test_a_stop_in_the_middle_of_a_burst_keeps_the_waiting_requests_for_the_next_start(rig: Rig) -> None:
    """``systemctl restart``: what the stop would refuse stays accepted and is answered after it."""
    _, app, tester = rig
    ids = [f"t-{i}" for i in range(N)]
    tester.ask(ids)
    tester.wait(lambda: tester.answered() >= 3, 60, "the first answers")
    app.stop()
    before = answered(tester)
    with tester.cond:
        refused = [c for copies in tester.replies.values() for c in copies if b'"status":"error"' in c]
    assert refused == [], "a stop must not answer waiting requests with an error"
    app.start()
    resent = check_every_id_answered_once(tester, ids, before, app.log)
    assert len(before) < N and resent == 0
    print(f"stop (SIGTERM): {len(before)}/{N} answered before, {N - len(before)} after the restart")


def burst_then_broker_down(
    broker: MosquittoBroker, tester: Prompter, prefix: str,
) -> tuple[list[str], set[str]]:
    """N prompts, then the broker stops after the first answers; returns the ids and those answered."""
    ids = [f"{prefix}-{i}" for i in range(N)]
    tester.ask(ids)
    tester.wait(lambda: tester.answered() >= 3, 60, "the first answers")
    broker.stop()
    return ids, answered(tester)


def test_a_broker_restart_and_a_kill_while_it_is_down_lose_nothing(rig: Rig) -> None:
    """Replies made while the broker is away live only in the appliance's memory and its journal."""
    broker, app, tester = rig
    ids, before = burst_then_broker_down(broker, tester, "b")
    time.sleep(1.0)  # the appliance keeps answering into paho's queue
    app.kill9()
    broker.start()
    app.start()
    resent = check_every_id_answered_once(tester, ids, before, app.log)
    assert len(before) < N
    print(f"broker stop + kill -9 while it is down: {len(before)}/{N} answered before, {resent} sent again")


def test_a_broker_restart_alone_loses_nothing(rig: Rig) -> None:
    broker, app, tester = rig
    ids, before = burst_then_broker_down(broker, tester, "s")
    time.sleep(1.0)
    broker.start()
    resent = check_every_id_answered_once(tester, ids, before, app.log)
    assert len(before) < N
    print(f"broker restart: {len(before)}/{N} answered before, {resent} sent again")
