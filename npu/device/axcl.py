"""The pyaxcl monitor: NPU and CPU load from the runtime, resets through ``axclrtResetDevice``.

pyaxcl (``import axcl``) is installed on the Pi from AXERA's wheel, not from PyPI, and is imported
only when this monitor is built. Its functions return status codes instead of raising. It does not
wrap the device properties (temperature, CMM), so those come from ``axcl-smi`` when it is there.
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType

from npu.device.base import DeviceReading, DeviceResetError, DeviceUnavailableError
from npu.device.smi import SmiMonitor

logger = logging.getLogger(__name__)


def import_axcl() -> ModuleType:
    """``axcl``, initialised; ``DeviceUnavailableError`` saying why when it cannot be used."""
    try:
        import axcl  # type: ignore[import-not-found]
    except (ImportError, OSError, SystemExit) as exc:
        raise DeviceUnavailableError(
            f"pyaxcl is not usable here ({exc!r}); install AXERA's pyaxcl wheel on the Pi, or use "
            "device.backend: smi or host"
        ) from exc
    status = axcl.init(None)
    if status != 0:
        code = status & 0xFFFFFFFF
        raise DeviceUnavailableError(f"axcl.init failed with status {code:#x} (is the card seen?)")
    return axcl  # type: ignore[no-any-return]


class AxclMonitor:
    name = "axcl"

    def __init__(self, smi: SmiMonitor | None = None, axcl: ModuleType | None = None) -> None:
        self.axcl = axcl or import_axcl()
        self.smi = smi
        self._lock = threading.Lock()

    def device_count(self) -> int:
        count, status = self.axcl.rt.get_device_count()
        return int(count) if status == 0 else 0

    def read(self, device_id: int) -> DeviceReading:
        base = self.smi.read(device_id) if self.smi is not None else DeviceReading(
            device_id, "axcl", error="temperature and CMM need axcl-smi, which is not available")
        with self._lock:
            status = self.axcl.rt.set_device(device_id)
            cpu, npu, _mem, rate_status = self.axcl.rt.get_device_utilization_rate(device_id)
        if status != 0 or rate_status != 0:
            code = status or rate_status
            return DeviceReading(device_id, "axcl", alive=False,
                                 error=f"device {device_id} does not answer (status {code & 0xFFFFFFFF:#x})")
        return DeviceReading(
            device_id, "axcl", temperature_c=base.temperature_c, mem_total_mib=base.mem_total_mib,
            mem_used_mib=base.mem_used_mib, cmm_total_mib=base.cmm_total_mib, cmm_used_mib=base.cmm_used_mib,
            npu_load_pct=float(npu), cpu_load_pct=float(cpu), error=base.error,
        )

    def reset(self, device_id: int) -> None:
        with self._lock:
            status = self.axcl.rt.set_device(device_id)
            if status == 0:
                status = self.axcl.rt.reset_device(device_id)
            if status == 0:
                status = self.axcl.rt.set_device(device_id)
        if status != 0:
            code = status & 0xFFFFFFFF
            raise DeviceResetError(f"resetting device {device_id} failed with status {code:#x}")

    def before_step(self, device_id: int) -> None:
        return None

    def close(self) -> None:
        try:
            self.axcl.finalize()
        except Exception:  # closing must never stop a shutdown
            logger.exception("axcl.finalize failed")
