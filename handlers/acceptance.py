"""What a durable acceptance journal must offer the handlers (the journal itself is appliance I/O).

A prompt is *accepted* when the journal holds it: only then is it acknowledged to the broker, so a
crash or power cut after that point loses nothing. Its final reply is written to the journal before
it is published and marked *delivered* when the broker acknowledges it; after a restart, accepted
prompts are run again and replies not yet delivered are published again. Requests are told apart
by ``(sender, id, digest of the payload)``, so a QoS 1 redelivery or a client resending the same
request within the journal's window costs no second generation; a request without an id is
matched only as a redelivery, by its packet id too.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Outgoing:
    """One message of a final reply, as the wire will carry it (kept for a re-send)."""

    topic: str
    payload: bytes
    correlation_data: bytes | None = None


@dataclass(frozen=True)
class Accepted:
    """A request as the journal keeps it: enough to run it again after a restart.

    ``given_id`` is the caller's id as text (None when it gave none); ``request_id`` the id the
    appliance answers with (the caller's, or one it assigned). ``received`` is wall-clock time, so
    deadlines still count from the original receipt after a restart.
    """

    sender: str | None
    given_id: str | None
    request_id: str
    kind: str
    digest: bytes
    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    message_expiry: int | None
    qos: int
    received: float
    mid: int = 0  # the MQTT packet id it came with: a redelivery keeps it


class Seen(enum.Enum):
    NEW = "new"  # journaled now: run it
    PENDING = "pending"  # the same request is already accepted and not answered yet
    ANSWERED = "answered"  # the same request was answered within the window


@dataclass(frozen=True)
class Admission:
    seen: Seen
    seq: int | None = None  # the journal row of a NEW request
    reply: tuple[Outgoing, ...] = ()  # the stored reply of an ANSWERED one


class JournalLike(Protocol):
    """The journal as handlers use it (``appliance.journal.Journal``)."""

    @property
    def closing(self) -> bool: ...
    def admit(self, request: Accepted, *, redelivered: bool) -> Admission: ...
    def replied(self, seq: int, messages: Sequence[Outgoing]) -> None: ...
    def delivered(self, seq: int) -> None: ...


def request_digest(kind: str, payload: bytes) -> bytes:
    """What makes two requests with the same sender and id the same request."""
    return hashlib.sha256(kind.encode() + b"\x00" + payload).digest()[:16]


@dataclass(frozen=True)
class Replayed:
    """A journaled request run again after a restart (the dispatcher skips admission)."""

    seq: int
    request_id: str
