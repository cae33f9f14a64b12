"""The topic tree: builders, inbound prefix stripping and reply-topic refusals."""

from __future__ import annotations

import pytest

from appliance.topics import Topics, check_topic_level


@pytest.fixture
def topics() -> Topics:
    return Topics("appliance")


def test_builders(topics: Topics) -> None:
    assert topics.status == "appliance/status"
    assert topics.info == "appliance/info"
    assert topics.state == "appliance/state"
    assert topics.telemetry == "appliance/telemetry"
    assert topics.telemetry_metric("npu_temp") == "appliance/telemetry/npu_temp"
    assert topics.event == "appliance/event"
    assert topics.request("chat") == "appliance/request/chat"
    assert topics.response("chat") == "appliance/response/chat"
    assert topics.response_text("chat") == "appliance/response/chat/text"
    assert topics.stream("abc-1") == "appliance/stream/abc-1"
    assert topics.display("lobby") == "appliance/display/lobby"
    assert topics.display_meta("lobby") == "appliance/display/lobby/meta"
    assert topics.ha_discovery("appliance_1") == "homeassistant/device/appliance_1/config"


def test_base_is_normalised_and_validated() -> None:
    assert Topics("/site/a1/").status == "site/a1/status"
    for bad in ("", "/", "a/+", "a/#", "$SYS", "a\x00b"):
        with pytest.raises(ValueError):
            Topics(bad)
    with pytest.raises(ValueError):
        Topics("a", shared_group="g/h")


@pytest.mark.parametrize("bad", ["a/b", "a+", "#", "x\x00", ""])
def test_levels_refuse_separators_and_wildcards(topics: Topics, bad: str) -> None:
    assert check_topic_level(bad) is not None
    with pytest.raises(ValueError):
        topics.stream(bad)


def test_subscriptions_plain_and_shared() -> None:
    assert Topics("appliance").subscriptions() == ["appliance/request/+"]
    assert Topics("appliance", shared_group="npus").subscriptions() == ["$share/npus/appliance/request/+"]


def test_request_kind(topics: Topics) -> None:
    assert topics.request_kind("appliance/request/chat") == "chat"
    assert topics.request_kind("appliance/request/health_check") == "health_check"
    assert topics.request_kind("$share/g/appliance/request/chat") == "chat"
    assert topics.request_kind("appliance/request/") is None
    assert topics.request_kind("appliance/request/chat/extra") is None
    assert topics.request_kind("appliance/response/chat") is None
    assert topics.request_kind("other/request/chat") is None


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "a/+/b",
        "a/#",
        "x\x00y",
        "$SYS/broker",
        "t" * 65536,
        "appliance/request/chat",
        "appliance/request",
        "appliance/status",
        "appliance/display/lobby",
        "appliance/info",
        "appliance/state",
        "appliance/telemetry/temp",
        "appliance/event",
        "appliance/stream/1",
        "homeassistant/device/x/config",
        "homeassistant",
    ],
)
def test_reply_topic_refused(topics: Topics, topic: str) -> None:
    reason = topics.check_reply_topic(topic)
    assert reason is not None and len(reason) < 400


@pytest.mark.parametrize(
    "topic",
    [
        "client/42/reply",
        "appliance/response/chat",
        "appliance/responses",
        "appliance/statusx",
        "home/assistant",
    ],
)
def test_reply_topic_allowed(topics: Topics, topic: str) -> None:
    assert topics.check_reply_topic(topic) is None
