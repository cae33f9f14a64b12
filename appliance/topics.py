"""The appliance's topic tree, built in one place (DESIGN.md "MQTT").

Every topic the process publishes to or subscribes to comes from ``Topics``; nothing else builds
topic strings. The prefix is added on the way out and stripped on the way in (``request_kind``).
``check_reply_topic`` guards caller-chosen reply topics so a request can never make the appliance
publish onto its own tree, a wildcard, or Home Assistant's discovery prefix.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

MAX_TOPIC_BYTES = 65535
HA_PREFIX = "homeassistant"
# Sub-trees of {base} a caller may never name as a reply topic: they carry retained state, requests
# or streams that other clients trust to come from the appliance itself.
PROTECTED_LEVELS = ("request", "status", "display", "info", "state", "telemetry", "event", "stream")
_BAD_LEVEL_CHARS = ("/", "+", "#", "\x00")


def check_topic_level(value: str, what: str = "id") -> str | None:
    """Why ``value`` cannot be used as one topic level (None when it can).

    Ids end up in topics such as ``{base}/stream/<id>``; a ``/`` would open a deeper level and a
    ``+``/``#`` would be a wildcard, so such ids are refused (the caller gets ``bad_request``).
    """
    if not value:
        return f"{what} must not be empty"
    bad = [c for c in _BAD_LEVEL_CHARS if c in value]
    if bad:
        shown = ", ".join("NUL" if c == "\x00" else repr(c) for c in bad)
        return f"{what} {value[:64]!r} cannot be used in a topic: it contains {shown}"
    if len(value.encode("utf-8")) > 1024:
        return f"{what} is longer than 1024 bytes"
    return None


class Topics:
    """Typed helpers for ``{base}/...`` topics.

    Args:
        base_topic: the instance's unique prefix (default ``appliance``); no wildcards, no
            leading/trailing ``/``.
        shared_group: when set, request topics are subscribed as ``$share/<group>/...`` so several
            appliances split one broker's requests.
    """

    def __init__(self, base_topic: str = "appliance", shared_group: str | None = None) -> None:
        base = base_topic.strip("/")
        if not base or any(c in base for c in ("+", "#", "\x00")) or base.startswith("$"):
            raise ValueError(f"base_topic {base_topic!r} must be non-empty, without + # NUL or a leading $")
        if shared_group is not None and (
            not shared_group or any(c in shared_group for c in _BAD_LEVEL_CHARS)
        ):
            raise ValueError(f"shared_group {shared_group!r} must be one topic level without wildcards")
        self.base = base
        self.shared_group = shared_group

    def __repr__(self) -> str:
        return f"Topics({self.base!r}, shared_group={self.shared_group!r})"

    # retained state and telemetry -------------------------------------------------------------
    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def info(self) -> str:
        return f"{self.base}/info"

    @property
    def state(self) -> str:
        return f"{self.base}/state"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    def telemetry_metric(self, name: str) -> str:
        self._require_level(name, "metric name")
        return f"{self.base}/telemetry/{name}"

    @property
    def event(self) -> str:
        return f"{self.base}/event"

    # requests and replies ---------------------------------------------------------------------
    @property
    def request_prefix(self) -> str:
        return f"{self.base}/request/"

    def request(self, kind: str) -> str:
        self._require_level(kind, "request kind")
        return f"{self.base}/request/{kind}"

    def response(self, kind: str) -> str:
        self._require_level(kind, "request kind")
        return f"{self.base}/response/{kind}"

    def response_text(self, kind: str) -> str:
        """Plain-text copy of a reply, cut short for microcontrollers."""
        return f"{self.response(kind)}/text"

    def stream(self, request_id: str) -> str:
        self._require_level(request_id, "id")
        return f"{self.base}/stream/{request_id}"

    # displays and discovery -------------------------------------------------------------------
    def display(self, name: str) -> str:
        self._require_level(name, "display name")
        return f"{self.base}/display/{name}"

    def display_meta(self, name: str) -> str:
        return f"{self.display(name)}/meta"

    @staticmethod
    def ha_discovery(node_id: str) -> str:
        if check_topic_level(node_id, "node id") is not None:
            raise ValueError(f"bad Home Assistant node id {node_id!r}")
        return f"{HA_PREFIX}/device/{node_id}/config"

    @property
    def ha_status(self) -> str:
        """Home Assistant's birth and last-will topic: ``online`` asks for discovery again."""
        return f"{HA_PREFIX}/status"

    # inbound ----------------------------------------------------------------------------------
    def subscriptions(self) -> list[str]:
        """Topic filters the link subscribes to (QoS 1) on every connect."""
        topic = f"{self.base}/request/+"
        if self.shared_group:
            topic = f"$share/{self.shared_group}/{topic}"
        return [topic]

    def request_kind(self, topic: str) -> str | None:
        """The request kind of an inbound topic (``{base}/request/chat`` -> ``chat``), else None.

        A ``$share/<group>/`` prefix is tolerated: brokers deliver the plain topic, but be lenient.
        """
        if topic.startswith("$share/"):
            parts = topic.split("/", 2)
            topic = parts[2] if len(parts) == 3 else ""
        prefix = self.request_prefix
        if not topic.startswith(prefix):
            return None
        kind = topic[len(prefix):]
        if not kind or "/" in kind:
            return None
        return kind

    def check_reply_topic(self, topic: str) -> str | None:
        """Why ``topic`` may not receive a reply (None when it may)."""
        return check_reply_topic(topic, self.base)

    @staticmethod
    def _require_level(value: str, what: str) -> None:
        reason = check_topic_level(value, what)
        if reason is not None:
            raise ValueError(reason)


def check_reply_topic(topic: str, base: str) -> str | None:
    """Refusal reason for a caller-chosen reply topic, or None when it is acceptable.

    Refused: empty, wildcards ``+``/``#``, NUL, leading ``$`` (broker-internal), over 65535 bytes,
    the appliance's own request/status/display/info/state/telemetry/event/stream trees, and
    ``homeassistant/``.
    """
    if not topic:
        return "reply topic is empty"
    if "+" in topic or "#" in topic:
        return f"reply topic {topic[:128]!r} contains a wildcard (+ or #)"
    if "\x00" in topic:
        return "reply topic contains a NUL character"
    if topic.startswith("$"):
        return f"reply topic {topic[:128]!r} starts with $ (reserved for the broker)"
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"reply topic is longer than {MAX_TOPIC_BYTES} bytes"
    base = base.strip("/")
    for level in PROTECTED_LEVELS:
        root = f"{base}/{level}"
        if topic == root or topic.startswith(root + "/"):
            return f"reply topic {topic[:128]!r} falls under {root}, which the appliance owns"
    if topic == HA_PREFIX or topic.startswith(HA_PREFIX + "/"):
        return f"reply topic {topic[:128]!r} falls under {HA_PREFIX}/ (Home Assistant discovery)"
    return None
