"""The appliance's topic tree, built in one place (docs/TOPICS.md).

Every topic the process publishes to or subscribes to comes from ``Topics``; nothing else builds
topic strings. The prefix is added on the way out and stripped on the way in (``request_kind``).
``check_reply_topic`` guards caller-chosen reply topics so a request can never make the appliance
publish outside the reply space ``replies/<sender>/...``.

Senders: a request on ``{base}/request/<op>`` is public (its answer goes to the shared
``{base}/response/<op>``); one on ``{base}/request/<op>/<sender>`` comes from ``<sender>``, a name
the broker's ACL pins to the MQTT user (``scripts/mosquitto_users``), and is answered only in that
sender's own reply space ``replies/<sender>/``, which the ACL lets no one else read.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

MAX_TOPIC_BYTES = 65535
HA_PREFIX = "homeassistant"
# Sub-trees of {base} a caller may never name as a reply topic: they carry retained state, requests
# or streams that other clients trust to come from the appliance itself.
REPLY_SPACE = "replies"  # replies/<sender>/...: the only topics a caller may name for its replies
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

    @property
    def scene(self) -> str:
        """The current scene, retained JSON (``appliance.scenes``)."""
        return f"{self.base}/scene"

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

    def progress(self, request_id: str) -> str:
        """A public job's place in the queue and its progress: ``{id, state, position, eta_s, ...}``."""
        self._require_level(request_id, "id")
        return f"{self.base}/progress/{request_id}"

    @property
    def queue(self) -> str:
        """Retained: the queue's length and when a request sent now would start."""
        return f"{self.base}/queue"

    # displays and discovery -------------------------------------------------------------------
    def display(self, name: str) -> str:
        self._require_level(name, "display name")
        return f"{self.base}/display/{name}"

    def display_meta(self, name: str) -> str:
        return f"{self.display(name)}/meta"

    def display_preview(self, name: str) -> str:
        """Not retained: small JPEG previews of the picture being made for this display."""
        return f"{self.display(name)}/preview"

    def audio(self, speaker: str) -> str:
        """``{base}/audio/<speaker>``: a spoken utterance as one WAV (not retained)."""
        self._require_level(speaker, "speaker")
        return f"{self.base}/audio/{speaker}"

    def audio_chunk(self, speaker: str) -> str:
        """``{base}/audio/<speaker>/chunk``: the same utterance as PCM pieces between start and end."""
        return f"{self.audio(speaker)}/chunk"

    @property
    def listen_filter(self) -> str:
        """``{base}/listen/<node>/start|audio|stop``: microphones streaming an utterance."""
        return f"{self.base}/listen/+/+"

    def parse_listen(self, topic: str) -> tuple[str, str] | None:
        """``(node, action)`` of a listen topic, else None."""
        prefix = f"{self.base}/listen/"
        if not topic.startswith(prefix):
            return None
        levels = topic[len(prefix):].split("/")
        if len(levels) != 2 or not levels[0] or levels[1] not in ("start", "audio", "stop"):
            return None
        return levels[0], levels[1]

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
        """Topic filters the link subscribes to (QoS 1) on every connect: public and named requests."""
        filters = [f"{self.base}/request/+", f"{self.base}/request/+/+"]
        if self.shared_group:
            filters = [f"$share/{self.shared_group}/{f}" for f in filters]
        return filters

    def request_kind(self, topic: str) -> str | None:
        """The request kind of an inbound topic (``{base}/request/chat`` -> ``chat``), else None."""
        parsed = self.parse_request(topic)
        return parsed[0] if parsed is not None else None

    def parse_request(self, topic: str) -> tuple[str, str | None] | None:
        """``(kind, sender)`` of an inbound request topic, else None.

        ``{base}/request/chat`` -> ``("chat", None)`` (public); ``{base}/request/chat/arduino-7``
        -> ``("chat", "arduino-7")``. A ``$share/<group>/`` prefix is tolerated: brokers deliver
        the plain topic, but be lenient.
        """
        if topic.startswith("$share/"):
            parts = topic.split("/", 2)
            topic = parts[2] if len(parts) == 3 else ""
        prefix = self.request_prefix
        if not topic.startswith(prefix):
            return None
        levels = topic[len(prefix):].split("/")
        if len(levels) > 2 or any(not level for level in levels):
            return None
        return levels[0], (levels[1] if len(levels) == 2 else None)

    # replies ----------------------------------------------------------------------------------
    @staticmethod
    def reply_space(sender: str) -> str:
        """``replies/<sender>``: where a named sender's answers go, readable by it alone."""
        reason = check_topic_level(sender, "sender")
        if reason is not None:
            raise ValueError(reason)
        return f"{REPLY_SPACE}/{sender}"

    def sender_response(self, sender: str, kind: str) -> str:
        """A named sender's default reply topic, ``replies/<sender>/<kind>``."""
        self._require_level(kind, "request kind")
        return f"{self.reply_space(sender)}/{kind}"

    def check_reply_topic(self, topic: str, sender: str | None = None) -> str | None:
        """Why ``topic`` may not receive ``sender``'s reply (None when it may)."""
        return check_reply_topic(topic, sender)

    @staticmethod
    def _require_level(value: str, what: str) -> None:
        reason = check_topic_level(value, what)
        if reason is not None:
            raise ValueError(reason)


def check_reply_topic(topic: str, sender: str | None = None) -> str | None:
    """Refusal reason for a caller-chosen reply topic, or None when it is acceptable.

    A reply topic must lie in the reply space: ``replies/<sender>`` or below it for a named sender,
    ``replies/<name>`` or below for a public request (the ACL decides who reads ``<name>``). So
    the appliance's own tree, other appliances' trees, ``homeassistant/``, ``$``-topics and
    variants in case or with empty levels are all refused, as are wildcards and NUL.
    """
    if not topic:
        return "reply topic is empty"
    shown = repr(topic[:128])
    if "+" in topic or "#" in topic:
        return f"reply topic {shown} contains a wildcard (+ or #)"
    if "\x00" in topic:
        return "reply topic contains a NUL character"
    if len(topic.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"reply topic is longer than {MAX_TOPIC_BYTES} bytes"
    levels = topic.split("/")
    if levels[0] != REPLY_SPACE or len(levels) < 2:
        where = f"{REPLY_SPACE}/{sender}/..." if sender else f"{REPLY_SPACE}/<your name>/..."
        return f"reply topic {shown} is outside the reply space: use {where}"
    if any(not level for level in levels):
        return f"reply topic {shown} has an empty level"
    if sender is not None and levels[1] != sender:
        return f"reply topic {shown} is not in your reply space {REPLY_SPACE}/{sender}/"
    return None
