"""What every device monitor reports, and the interface the health jobs and the engine use.

A monitor never raises from ``read``: an unknown value is ``None`` with the reason in ``error``,
so a flaky tool or an odd firmware never stops the telemetry or the appliance. ``reset`` raises
``DeviceResetError`` when the device did not come back, which the recovery counts as a failed
attempt.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol


class DeviceResetError(RuntimeError):
    """The device could not be reset (the tool failed, timed out, or the device stays dead)."""


class DeviceUnavailableError(RuntimeError):
    """A monitor backend cannot be used here (library missing, no card); the message says why."""


class DeviceFault(RuntimeError):
    """An inference step failed because the device went away (reset or dead)."""


@dataclass(frozen=True)
class DeviceReading:
    device_id: int
    source: str  # axcl | smi | host | sim
    temperature_c: float | None = None
    mem_total_mib: float | None = None
    mem_used_mib: float | None = None
    cmm_total_mib: float | None = None
    cmm_used_mib: float | None = None
    npu_load_pct: float | None = None
    cpu_load_pct: float | None = None
    alive: bool = True
    error: str | None = None  # why some value is unknown

    def __post_init__(self) -> None:
        """A non-finite figure (a sensor answering inf or NaN) is unknown: ``None``, never a number
        that JSON cannot carry (``/health`` would fail) or a dashboard would plot."""
        bad = [f.name for f in fields(self) if isinstance(v := getattr(self, f.name), float)
               and not math.isfinite(v)]
        for name in bad:
            object.__setattr__(self, name, None)
        if bad:
            note = f"not a finite reading: {', '.join(bad)}"
            object.__setattr__(self, "error", f"{self.error}; {note}" if self.error else note)

    @property
    def cmm_free_mib(self) -> float | None:
        if self.cmm_total_mib is None or self.cmm_used_mib is None:
            return None
        return self.cmm_total_mib - self.cmm_used_mib

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cmm_free_mib": self.cmm_free_mib}


class DeviceMonitor(Protocol):
    name: str

    def read(self, device_id: int) -> DeviceReading:
        """The current readings; never raises."""
        ...

    def reset(self, device_id: int) -> None:
        """Reboot card ``device_id`` (an index) and wait until it answers again; raises
        ``DeviceResetError``. On a real card this is ``axcl-smi reboot``, never pyaxcl's
        ``reset_device``, which only releases this process's context. The recovery closes the
        card's sessions after this returns and before it loads the models again."""
        ...

    def before_step(self, device_id: int) -> None:
        """Called by the engine before each inference step (the sim device injects faults here)."""
        ...

    def close(self) -> None: ...
