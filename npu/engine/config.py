"""The engine's settings: the one definition of each, with its default.

``appliance/config.py`` validates the YAML and the environment and maps onto these; everything
else reads them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SenderLimits:
    """What one sender may do: waiting jobs, requests per minute, the priority class it runs in."""

    max_queued: int | None = None  # None: only the queue's own bound
    per_minute: int | None = None  # None: no rate limit
    priority: int | None = None  # None: the request's own (chat normal, images low)


@dataclass(frozen=True)
class EngineConfig:
    queue_max: int = 32
    request_timeout: float = 120.0
    step_timeout: float = 30.0
    max_active: int = 2
    throttle_delay: float = 0.25  # seconds of cool-down between rounds of steps when throttled
    sender_limits: SenderLimits = SenderLimits()  # every sender no rule of ``senders`` names
    senders: Mapping[str, SenderLimits] = field(default_factory=dict)  # name or glob -> its limits


@dataclass(frozen=True)
class RecoveryConfig:
    attempts: int = 3
    backoff: float = 2.0  # seconds before the second attempt; doubles after each failure
    backoff_max: float = 60.0
    load_timeout: float = 600.0  # seconds the fresh worker may take to reload the models


@dataclass(frozen=True)
class ModelSpec:
    """A resident model as the config lists it; ``kind`` names its job kind (``npu.engine.kinds``)."""

    id: str
    kind: str
    path: Path
    runtime: str = "auto"
    preload: bool = True
    default: bool = False
    aliases: tuple[str, ...] = ()  # more names clients may ask for it by (gpt-4o-mini)
    prefixes: tuple[str, ...] = ()  # system prompts (its personas') prefilled at load and kept warm
