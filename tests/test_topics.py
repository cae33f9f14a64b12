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


def test_subscriptions_take_public_and_named_requests() -> None:
    assert Topics("appliance").subscriptions() == ["appliance/request/+", "appliance/request/+/+"]
    assert Topics("appliance", shared_group="npus").subscriptions() == [
        "$share/npus/appliance/request/+", "$share/npus/appliance/request/+/+"]


def test_request_kind_and_sender(topics: Topics) -> None:
    assert topics.parse_request("appliance/request/chat") == ("chat", None)
    assert topics.parse_request("appliance/request/chat/arduino-7") == ("chat", "arduino-7")
    assert topics.parse_request("$share/g/appliance/request/chat") == ("chat", None)
    assert topics.request_kind("appliance/request/health_check") == "health_check"
    for topic in ("appliance/request/", "appliance/request/chat/", "appliance/request//x",
                  "appliance/request/chat/a/b", "appliance/response/chat", "other/request/chat"):
        assert topics.parse_request(topic) is None, topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "a/+/b",
        "a/#",
        "x\x00y",
        "$SYS/broker",
        "t" * 65536,
        # the appliance's own tree, the shared text copy, and the base itself
        "appliance",
        "appliance/request/chat",
        "appliance/response/chat",
        "appliance/response/chat/text",
        "appliance/status",
        "appliance/display/lobby",
        "appliance/stream/1",
        # another appliance's tree, Home Assistant, anything outside the reply space
        "gallery2/request/chat",
        "homeassistant/device/x/config",
        "client/42/reply",
        # case and empty-level variants of the reply space
        "REPLIES/arduino-7",
        "Replies/arduino-7",
        "replies",
        "replies/",
        "replies//x",
        "replies/arduino-7//x",
        "replies/arduino-7/",
    ],
)
def test_reply_topic_refused(topics: Topics, topic: str) -> None:
    reason = topics.check_reply_topic(topic)
    assert reason is not None and len(reason) < 400


@pytest.mark.parametrize("topic", ["replies/arduino-7", "replies/arduino-7/chat", "replies/a/b/c"])
def test_reply_topic_allowed_for_public_requests(topics: Topics, topic: str) -> None:
    assert topics.check_reply_topic(topic) is None


def test_a_named_sender_may_only_name_its_own_reply_space(topics: Topics) -> None:
    assert topics.check_reply_topic("replies/arduino-7/x", "arduino-7") is None
    assert topics.check_reply_topic("replies/arduino-7", "arduino-7") is None
    reason = topics.check_reply_topic("replies/arduino-8/x", "arduino-7")
    assert reason is not None and "replies/arduino-7/" in reason
    assert topics.check_reply_topic("replies/arduino-77", "arduino-7") is not None
    assert topics.sender_response("arduino-7", "chat") == "replies/arduino-7/chat"
