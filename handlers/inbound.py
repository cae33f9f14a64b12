"""One received MQTT message as the handlers see it, copied out of paho's objects.

The MQTT link (``appliance.mqtt_link``) builds it, the journal replays it, and the dispatcher
(``handlers.registry``) reads it; the handlers never import paho.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from handlers.acceptance import Replayed


@dataclass(frozen=True)
class InboundMessage:
    """``message_expiry`` is the remaining MQTT 5 Message Expiry Interval in seconds (as the broker
    forwarded it), counted from ``received_at`` (``time.monotonic()``)."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation_data: bytes | None
    message_expiry: int | None
    received_at: float
    qos: int
    dup: bool = False  # the broker delivers it again (it may have been seen before)
    mid: int = 0  # the packet id; a redelivery keeps the one of its first delivery
    ack: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    replayed: Replayed | None = None  # a request run again from the journal after a restart
