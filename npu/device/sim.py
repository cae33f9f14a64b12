"""A simulated AX650 card: scripted temperature, CMM use and NPU load, and injectable faults.

It is how the tests, and an installer on a bench, rehearse failures without a card. Values and
faults come from the config's ``device.sim`` script (timed events) or are set at run time through
the control topic (``{base}/request/sim``). Faults act where a real card fails, in the inference
step: ``hang`` blocks the next step until the device is reset, ``reset`` makes the next step fail
as if the card rebooted under it, ``dead`` fails every step and every reset until cleared.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Literal

from npu.device.base import DeviceFault, DeviceReading, DeviceResetError

logger = logging.getLogger(__name__)

Fault = Literal["none", "hang", "reset", "dead"]
HANG_LIMIT = 3600.0  # a hung step gives up by itself after this long (never in practice)


@dataclass(frozen=True)
class SimState:
    temperature_c: float = 50.0
    cmm_total_mib: float = 7040.0
    cmm_used_mib: float = 18.0
    npu_load_pct: float = 0.0
    fault: Fault = "none"


@dataclass(frozen=True)
class SimEvent:
    """At ``at`` seconds after start, set the given values (``None`` keeps the current one)."""

    at: float
    temperature_c: float | None = None
    cmm_used_mib: float | None = None
    npu_load_pct: float | None = None
    fault: Fault | None = None


@dataclass
class _Device:
    state: SimState
    released: threading.Event = field(default_factory=threading.Event)  # set by reset: a hang ends
    resets: int = 0


class SimMonitor:
    """Implements ``DeviceMonitor`` for any number of simulated devices."""

    name = "sim"

    def __init__(self, initial: SimState | None = None, script: list[SimEvent] | None = None,
                 reset_seconds: float = 0.2) -> None:
        self._initial = initial or SimState()
        self._devices: dict[int, _Device] = {}
        self._script = sorted(script or [], key=lambda e: e.at)
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self.reset_seconds = reset_seconds

    def _device(self, device_id: int) -> _Device:
        with self._lock:
            self._play_script()
            dev = self._devices.get(device_id)
            if dev is None:
                dev = self._devices[device_id] = _Device(self._initial)
            return dev

    def _play_script(self) -> None:
        elapsed = time.monotonic() - self._started
        while self._script and self._script[0].at <= elapsed:
            event = self._script.pop(0)
            logger.info("sim device: script at %.1f s: %s", event.at, event)
            self._initial = _apply(self._initial, event)
            for dev in self._devices.values():
                dev.state = _apply(dev.state, event)

    # control ----------------------------------------------------------------------------------
    def set(self, device_id: int | None = None, **values: object) -> dict[int, SimState]:
        """Change values or the fault of one device (or all); returns the new states."""
        event = SimEvent(at=0.0, **values)  # type: ignore[arg-type]
        ids = [device_id] if device_id is not None else (list(self._devices) or [0])
        for i in ids:
            dev = self._device(i)
            with self._lock:
                dev.state = _apply(dev.state, event)
                if dev.state.fault == "none":
                    dev.released.set()  # clearing the faults also ends a hang in progress
        return {i: self._device(i).state for i in ids}

    def state(self, device_id: int) -> SimState:
        return self._device(device_id).state

    # DeviceMonitor -----------------------------------------------------------------------------
    def read(self, device_id: int) -> DeviceReading:
        s = self._device(device_id).state
        alive = s.fault != "dead"
        return DeviceReading(
            device_id=device_id, source="sim", temperature_c=s.temperature_c if alive else None,
            mem_total_mib=945.0, mem_used_mib=158.0, cmm_total_mib=s.cmm_total_mib,
            cmm_used_mib=s.cmm_used_mib, npu_load_pct=s.npu_load_pct, cpu_load_pct=1.0, alive=alive,
            error=None if alive else f"device {device_id}: dead",
        )

    def before_step(self, device_id: int) -> None:
        dev = self._device(device_id)
        fault = dev.state.fault
        if fault == "none":
            return
        if fault == "dead":
            raise DeviceFault(f"device {device_id} is dead")
        with self._lock:
            dev.state = replace(dev.state, fault="none")  # hang and reset strike once
            dev.released.clear()
        if fault == "reset":
            raise DeviceFault(f"device {device_id} reset itself during a step")
        logger.warning("sim device %d: this step hangs until the device is reset", device_id)
        dev.released.wait(HANG_LIMIT)
        raise DeviceFault(f"device {device_id} was reset while a step hung")

    def reset(self, device_id: int) -> None:
        dev = self._device(device_id)
        time.sleep(self.reset_seconds)
        if dev.state.fault == "dead":
            raise DeviceResetError(f"device {device_id} did not come back after the reset")
        with self._lock:
            dev.resets += 1
            dev.released.set()

    def resets(self, device_id: int) -> int:
        return self._device(device_id).resets

    def close(self) -> None:
        for dev in self._devices.values():
            dev.released.set()


def _apply(state: SimState, event: SimEvent) -> SimState:
    changes = {k: v for k in ("temperature_c", "cmm_used_mib", "npu_load_pct", "fault")
               if (v := getattr(event, k)) is not None}
    return replace(state, **changes)  # type: ignore[arg-type]
