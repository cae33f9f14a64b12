"""The engine's settings: the one definition of each, with its default.

``appliance/config.py`` validates the YAML and the environment and maps onto these; everything
else reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EngineConfig:
    queue_max: int = 32
    request_timeout: float = 120.0
    step_timeout: float = 30.0
    max_active: int = 2
    throttle_delay: float = 0.25  # seconds of cool-down between rounds of steps when throttled


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
