"""The thermal policy: a pure state machine from a temperature to a protection level.

Levels rise as soon as a threshold is reached and fall only once the temperature is clearly below
it (``hysteresis``), so a card hovering at 80 C does not flap between throttled and not. Leaving
``pause`` needs the temperature back under the *warn* level, as the card needs time to cool.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ThermalLevel(IntEnum):
    NORMAL = 0
    WARN = 1
    THROTTLE = 2
    PAUSE = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class ThermalLimits:
    warn_c: float = 75.0
    throttle_c: float = 80.0
    pause_c: float = 85.0
    hysteresis_c: float = 3.0

    def __post_init__(self) -> None:
        if not self.warn_c < self.throttle_c < self.pause_c:
            raise ValueError("thermal limits must rise: warn < throttle < pause")


def apply_thermal_policy(
    level: ThermalLevel, temperature_c: float | None, limits: ThermalLimits
) -> ThermalLevel:
    """The next level; an unknown temperature keeps the current one."""
    if temperature_c is None:
        return level
    t = temperature_c
    if t >= limits.pause_c:
        return ThermalLevel.PAUSE
    if level == ThermalLevel.PAUSE:
        if t >= limits.warn_c:
            return ThermalLevel.PAUSE
        level = ThermalLevel.WARN  # cooled below warn: fall through the lower rules
    if t >= limits.throttle_c:
        return max(level, ThermalLevel.THROTTLE)
    if level == ThermalLevel.THROTTLE and t > limits.throttle_c - limits.hysteresis_c:
        return ThermalLevel.THROTTLE
    if t >= limits.warn_c:
        return ThermalLevel.WARN
    if level >= ThermalLevel.WARN and t > limits.warn_c - limits.hysteresis_c:
        return ThermalLevel.WARN
    return ThermalLevel.NORMAL
