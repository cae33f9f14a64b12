"""The Node-RED example flow: it parses, uses only core and FlowFuse Dashboard 2.0 nodes, is wired
consistently, and every topic it uses exists in the appliance's topic tree."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from appliance.config import ThermalConfig
from appliance.telemetry import HEADLINE
from appliance.topics import Topics
from handlers.registry import build_registry

FLOW = Path(__file__).resolve().parents[1] / "examples/node-red/flows.json"
CORE = {"tab", "comment", "function", "change", "switch", "json", "template", "inject", "debug",
        "mqtt in", "mqtt out", "mqtt-broker", "link in", "link out", "delay"}
DASHBOARD = {"ui-base", "ui-theme", "ui-page", "ui-group", "ui-gauge", "ui-chart", "ui-text", "ui-form",
             "ui-template", "ui-button", "ui-notification"}


def nodes() -> list[dict[str, Any]]:
    data = json.loads(FLOW.read_text())
    assert isinstance(data, list)
    return data


def test_only_core_and_dashboard_nodes_with_consistent_wiring() -> None:
    flow = nodes()
    ids = [node["id"] for node in flow]
    assert len(ids) == len(set(ids))
    assert {node["type"] for node in flow} <= CORE | DASHBOARD
    known = set(ids)
    for node in flow:
        for output in node.get("wires", []):
            assert set(output) <= known, node["id"]
        refs = ["z", "group", "page", "ui", "theme"]
        if node["type"] in ("mqtt in", "mqtt out"):
            refs.append("broker")  # on the mqtt-broker node itself, "broker" is the host name
        for ref in refs:
            if node.get(ref):
                assert node[ref] in known, (node["id"], ref)


def test_every_topic_is_in_the_topic_tree() -> None:
    topics = Topics("appliance")
    tree = {topics.status, topics.state, topics.response("chat"), topics.display("main"),
            topics.display_meta("main"), *(topics.telemetry_metric(m) for m in HEADLINE)}
    flow = nodes()
    subscribed = {node["topic"] for node in flow if node["type"] == "mqtt in"}
    assert subscribed <= tree, subscribed - tree
    published = set(re.findall(r"msg\.topic = '([^']+)'", " ".join(n.get("func", "") for n in flow)))
    assert published == {topics.request("chat")} and "chat" in build_registry()
    assert {topics.telemetry_metric("temperature_c"), topics.telemetry_metric("tokens_per_s")} <= subscribed


def test_the_temperature_gauge_colours_follow_the_thermal_policy() -> None:
    gauge = next(n for n in nodes() if n["type"] == "ui-gauge" and "temperature" in n["name"])
    limits = ThermalConfig()
    starts = [float(s["from"]) for s in gauge["segments"]][1:]
    assert starts == [limits.warn, limits.throttle, limits.pause]
