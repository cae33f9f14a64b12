"""The host as the "device" when there is no NPU: its hottest thermal zone, memory and CPU load.

A reset does nothing here (there is no card), so a recovery on the CPU twin reloads the models.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from npu.device.base import DeviceReading

logger = logging.getLogger(__name__)


class HostMonitor:
    name = "host"

    def __init__(
        self, thermal_root: str | Path = "/sys/class/thermal", meminfo: str | Path = "/proc/meminfo"
    ) -> None:
        self.thermal_root = Path(thermal_root)
        self.meminfo = Path(meminfo)

    def _temperature(self) -> float | None:
        temps = []
        for zone in self.thermal_root.glob("thermal_zone*/temp"):
            try:
                temps.append(int(zone.read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                continue
        return max(temps) if temps else None

    def _memory(self) -> tuple[float | None, float | None]:
        try:
            fields = dict(line.split(":", 1) for line in self.meminfo.read_text().splitlines() if ":" in line)
            total = int(fields["MemTotal"].split()[0]) / 1024.0
            available = int(fields["MemAvailable"].split()[0]) / 1024.0
        except (OSError, KeyError, ValueError, IndexError):
            return None, None
        return total, total - available

    def read(self, device_id: int) -> DeviceReading:
        total, used = self._memory()
        try:
            load = os.getloadavg()[0] / (os.cpu_count() or 1) * 100.0
        except OSError:
            load = None
        temperature = self._temperature()
        return DeviceReading(
            device_id, "host", temperature_c=temperature, mem_total_mib=total, mem_used_mib=used,
            cpu_load_pct=None if load is None else round(load, 1),
            error=None if temperature is not None else "no thermal zone readable on this host",
        )

    def reset(self, device_id: int) -> None:
        logger.info("host monitor: no NPU to reset; the models are reloaded")

    def before_step(self, device_id: int) -> None:
        return None

    def close(self) -> None:
        return None
