"""The host as the "device" when there is no NPU: its hottest thermal zone, memory and CPU use.

CPU use is a real percentage (busy time over all cores between two reads of ``/proc/stat``), not
the load average, which counts waiting threads and reads 2000 "percent" on a busy 2-core machine.

A reset does nothing here (there is no card), so a recovery on the CPU twin reloads the models.
"""

from __future__ import annotations

import logging
from pathlib import Path

from npu.device.base import DeviceReading

logger = logging.getLogger(__name__)


class CpuUsage:
    """Busy share of every core between two reads of ``/proc/stat`` (the first read: since boot)."""

    def __init__(self, stat: str | Path = "/proc/stat") -> None:
        self.stat = Path(stat)
        self._last: tuple[int, int] | None = None  # (busy, total) jiffies at the previous read
        self._pct: float | None = None

    def percent(self) -> float | None:
        try:
            first = self.stat.read_text().split("\n", 1)[0].split()
            # user nice system idle iowait irq softirq steal (guest time is already in user)
            ticks = [int(v) for v in first[1:9]]
        except (OSError, ValueError):
            return None
        if first[0] != "cpu" or len(ticks) < 4:
            return None
        total = sum(ticks)
        busy = total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
        before = self._last or (0, 0)
        self._last = (busy, total)
        if total > before[1]:  # else read twice within one tick: the last figure still holds
            self._pct = round(min(100.0, max(0.0, 100.0 * (busy - before[0]) / (total - before[1]))), 1)
        return self._pct


class HostMonitor:
    name = "host"

    def __init__(
        self, thermal_root: str | Path = "/sys/class/thermal", meminfo: str | Path = "/proc/meminfo",
        stat: str | Path = "/proc/stat",
    ) -> None:
        self.thermal_root = Path(thermal_root)
        self.meminfo = Path(meminfo)
        self.cpu = CpuUsage(stat)

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
        temperature = self._temperature()
        return DeviceReading(
            device_id, "host", temperature_c=temperature, mem_total_mib=total, mem_used_mib=used,
            cpu_load_pct=self.cpu.percent(),
            error=None if temperature is not None else "no thermal zone readable on this host",
        )

    def reset(self, device_id: int) -> None:
        logger.info("host monitor: no NPU to reset; the models are reloaded")

    def before_step(self, device_id: int) -> None:
        return None

    def close(self) -> None:
        return None
