"""Fair sharing: senders served in turn, per-sender limits, priority classes, per-sender counters.

One appliance for the module, a real Mosquitto, the real demo model and the real ``openai``
client. Requests are published while the queue is paused (the ``pause`` op), so the order in
which they wait is known exactly; ``resume`` then lets the workers take them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import load_config
from npu.engine.api import ChatRequest, JobHandle
from npu.engine.job import WorkerJob
from npu.engine.queue import JobQueue

SHORT = {"max_tokens": 6, "temperature": 0}
SENDERS = {
    "limited": {"max_queued": 2},
    "metered-*": {"per_minute": 2},
    "console": {"priority": "high"},
    "http:127.0.0.1": {"per_minute": 3},
}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, mqtt_broker, demo_bundle_fp32: Path) -> Iterator[Appliance]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("fair")
    path = write_config(tmp, mqtt_broker.port, "fair", demo_bundle_fp32,
                        engine={"queue_max": 100, "max_active": 2, "senders": SENDERS},
                        http={"enabled": True, "host": "127.0.0.1", "port": 0},
                        journal={"path": str(tmp / "journal.sqlite3")})
    appliance = Appliance(load_config(path, env={}))
    appliance.start()
    assert appliance.engine.wait_loaded(120) and appliance.link.subscribed.wait(10)
    yield appliance
    appliance.stop()


@pytest.fixture
def client(mqtt_broker) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    c = Client(mqtt_broker.port)
    yield c
    c.close()


def paused(client: Client, app: Appliance) -> None:
    client.publish("fair/request/pause", {"id": "p", "reason": "test"})
    deadline = time.monotonic() + 10
    while app.engine.state().state != "paused" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.engine.state().state == "paused"


def wait_queued(app: Appliance, n: int) -> None:
    deadline = time.monotonic() + 30
    while app.engine.state().queue_depth < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert app.engine.state().queue_depth == n


def arrivals(client: Client, *topics: str) -> list[tuple[str, dict[str, Any]]]:
    """Every reply on these topics, in the order they arrived."""
    with client.cond:
        messages = [m for t in topics for m in client.messages[t]]
    messages.sort(key=lambda m: m.timestamp)
    return [(m.topic, json.loads(m.payload)) for m in messages]


def test_a_flooding_sender_does_not_starve_another(app: Appliance, client: Client) -> None:
    client.subscribe("replies/flood/chat", "replies/calm/chat")
    paused(client, app)
    for i in range(50):
        client.publish("fair/request/chat/flood", {"id": f"f{i}", "prompt": f"Count to {i}.", **SHORT})
    for i in range(3):
        client.publish("fair/request/chat/calm", {"id": f"c{i}", "prompt": "Name a colour.", **SHORT})
    wait_queued(app, 53)
    client.publish("fair/request/resume", {"id": "r"})
    client.wait(lambda: len(client.messages["replies/calm/chat"]) == 3
                and len(client.messages["replies/flood/chat"]) >= 10, timeout=120)
    order = arrivals(client, "replies/flood/chat", "replies/calm/chat")
    calm = [i for i, (topic, _) in enumerate(order) if topic == "replies/calm/chat"]
    tenth_flood = [i for i, (topic, _) in enumerate(order) if topic == "replies/flood/chat"][9]
    assert all(body["status"] == "ok" for _, body in order)
    assert max(calm) < tenth_flood, [body["id"] for _, body in order[:14]]
    for i in range(50):  # the rest of the flood is not needed
        app.engine.cancel(f"flood/f{i}")


def test_a_sender_over_its_queue_limit_is_refused_and_no_one_else_is(app: Appliance, client: Client) -> None:
    app.engine.wait_idle(120)
    client.subscribe("replies/limited/chat", "replies/calm/chat")
    paused(client, app)
    for i in range(3):
        client.publish("fair/request/chat/limited", {"id": f"l{i}", "prompt": "Hi.", **SHORT})
    client.publish("fair/request/chat/calm", {"id": "c-after", "prompt": "Hi.", **SHORT})
    client.wait(lambda: any(b["id"] == "l2" for b in client.json("replies/limited/chat")))
    refused = next(b for b in client.json("replies/limited/chat") if b["id"] == "l2")
    assert refused["status"] == "error" and refused["error"]["code"] == "rate_limited"
    assert refused["error"]["retry_after"] > 0 and "limited" in refused["error"]["message"]
    wait_queued(app, 3)  # l0, l1 and the other sender's request
    client.publish("fair/request/resume", {"id": "r"})
    client.wait(lambda: len(client.json("replies/limited/chat")) == 3 and client.json("replies/calm/chat"))
    assert {b["id"]: b["status"] for b in client.json("replies/limited/chat")} == {
        "l0": "ok", "l1": "ok", "l2": "error"}
    assert client.json("replies/calm/chat")[0]["status"] == "ok"
    metrics = httpx.get(f"http://127.0.0.1:{app.http.bound_port}/metrics").text  # type: ignore[union-attr]
    assert 'appliance_sender_rejected_total{code="rate_limited",sender="limited"} 1.0' in metrics
    assert 'appliance_sender_requests_total{sender="limited"} 2.0' in metrics


def test_a_sender_over_its_rate_is_told_when_to_retry(app: Appliance, client: Client) -> None:
    client.subscribe("replies/metered-1/chat")
    for i in range(3):
        client.publish("fair/request/chat/metered-1", {"id": f"m{i}", "prompt": "Hi.", **SHORT})
    client.wait(lambda: len(client.json("replies/metered-1/chat")) == 3)
    by_id = {b["id"]: b for b in client.json("replies/metered-1/chat")}
    assert by_id["m0"]["status"] == by_id["m1"]["status"] == "ok"
    error = by_id["m2"]["error"]
    assert error["code"] == "rate_limited" and 1 <= error["retry_after"] <= 60
    assert "2 requests in the last minute" in error["message"]


def test_the_operators_console_goes_before_a_waiting_flood(app: Appliance, client: Client) -> None:
    app.engine.wait_idle(120)
    client.subscribe("replies/sensor/chat", "replies/console/chat")
    paused(client, app)
    for i in range(6):
        client.publish("fair/request/chat/sensor", {"id": f"s{i}", "prompt": "Hi.", **SHORT})
    client.publish("fair/request/chat/console", {"id": "op", "prompt": "Status?", **SHORT})
    wait_queued(app, 7)
    client.publish("fair/request/resume", {"id": "r"})
    client.wait(lambda: len(client.messages["replies/sensor/chat"]) == 6
                and client.messages["replies/console/chat"])
    order = [body["id"] for _, body in arrivals(client, "replies/sensor/chat", "replies/console/chat")]
    assert order.index("op") <= 1, order  # taken first; at most the job started beside it ends sooner


def test_http_clients_are_rate_limited_with_retry_after_and_counted_in_telemetry(app: Appliance) -> None:
    app.engine.wait_idle(120)
    port = app.http.bound_port  # type: ignore[union-attr]
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    for _ in range(3):
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
    with pytest.raises(openai.RateLimitError) as raised:
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi."}], max_tokens=4)
    assert raised.value.status_code == 429 and raised.value.code == "rate_limited"
    assert 1 <= float(raised.value.response.headers["retry-after"]) <= 60
    senders = app.telemetry.run()["senders"]
    assert senders["http:127.0.0.1"]["requests"] == 3 and senders["http:127.0.0.1"]["rate_limited"] == 1


def _job(sender: str | None, priority: int = 1) -> WorkerJob:
    request = ChatRequest(prompt="x", sender=sender, priority=priority)  # type: ignore[arg-type]
    return WorkerJob(JobHandle(request, lambda event: None), "m", None)  # type: ignore[arg-type]


def test_the_service_order_is_what_pop_takes_and_positions_follow_it() -> None:
    queue = JobQueue()
    jobs = [_job("a") for _ in range(3)] + [_job("b"), _job(None), _job("c", priority=0)]
    for job in jobs:
        queue.push(job)
    retried = _job("b")
    queue.push_front(retried)
    order = queue.order()
    assert [j.handle.request.sender for j in order] == ["c", "b", "a", "b", None, "a", "a"]
    assert order[1] is retried
    assert queue.position(jobs[2].handle) == 6 and queue.position(jobs[5].handle) == 0
    assert queue.waiting_of("a") == 3 and queue.waiting_of(None) == 1
    assert queue.remove(jobs[3].handle) is jobs[3] and queue.position(jobs[3].handle) is None
    taken = [queue.pop() for _ in range(len(queue))]
    assert [j.handle.request.sender for j in taken] == ["c", "b", "a", None, "a", "a"]
    assert len(queue) == 0 and queue.waiting_by_sender() == {}


def test_senders_beyond_the_counted_ones_are_counted_together() -> None:
    """Clients that change address on every request must not grow /metrics without bound."""
    from prometheus_client import CollectorRegistry

    from npu.engine.config import SenderLimits
    from npu.engine.senders import MAX_COUNTED, SenderGate

    registry = CollectorRegistry()
    gate = SenderGate(SenderLimits(), {}, registry, dict)
    for i in range(MAX_COUNTED + 5):
        gate.accepted(f"http:10.0.{i // 256}.{i % 256}")
    assert len(gate.counts) == MAX_COUNTED + 1 and gate.counts["other"].requests == 5
    assert registry.get_sample_value("appliance_sender_requests_total", {"sender": "other"}) == 5
    gate.accepted("http:10.0.0.1")  # one already counted keeps its own name
    assert gate.counts["http:10.0.0.1"].requests == 2
