"""Which device monitor to use: ``auto`` picks pyaxcl, then ``axcl-smi``, then the host."""

from __future__ import annotations

import logging
import shutil
from typing import Literal

from npu.device.base import DeviceMonitor, DeviceUnavailableError
from npu.device.host import HostMonitor
from npu.device.smi import SmiMonitor

logger = logging.getLogger(__name__)

Backend = Literal["auto", "axcl", "smi", "host"]


def smi_available(path: str) -> bool:
    return shutil.which(path) is not None


def make_monitor(backend: Backend, *, smi_path: str = "axcl-smi") -> DeviceMonitor:
    """The monitor for ``backend``; ``DeviceUnavailableError`` when a forced one cannot work.

    The simulated card is built by the appliance from its config (``npu.device.sim``).
    """
    smi = SmiMonitor(smi_path) if smi_available(smi_path) else None
    if backend in ("auto", "axcl"):
        try:
            from npu.device.axcl import AxclMonitor

            monitor = AxclMonitor(smi)
            if monitor.device_count() > 0:
                return monitor
            if backend == "axcl":
                raise DeviceUnavailableError("pyaxcl sees no NPU card")
            monitor.close()
        except DeviceUnavailableError as exc:
            if backend == "axcl":
                raise
            logger.debug("no pyaxcl monitor: %s", exc)
    if backend in ("auto", "smi"):
        if smi is not None:
            return smi
        if backend == "smi":
            raise DeviceUnavailableError(f"{smi_path} was not found; set device.smi_path")
    if backend not in ("auto", "host"):
        raise ValueError(f"unknown device backend {backend!r}")
    return HostMonitor()
