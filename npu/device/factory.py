"""Which device monitor to use: ``auto`` picks pyaxcl, then ``axcl-smi``, then the host.

``auto`` falls back when pyaxcl cannot be imported, when ``axcl.init`` fails, or when the runtime
lists no card, and says so in one warning line. A forced ``axcl`` fails instead, with the check
that failed and how to fix it.
"""

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
    if backend not in ("auto", "axcl", "smi", "host"):
        raise ValueError(f"unknown device backend {backend!r}")
    smi = SmiMonitor(smi_path) if smi_available(smi_path) else None
    if backend in ("auto", "axcl"):
        from npu.device.axcl import AxclMonitor

        try:
            return AxclMonitor(smi)
        except DeviceUnavailableError as exc:
            if backend == "axcl":
                raise DeviceUnavailableError(f"device.backend is axcl, but {exc}") from exc
            if smi is not None:
                logger.warning("device monitor: pyaxcl not used (%s); using %s", exc, smi_path)
                return smi
            logger.warning("device monitor: pyaxcl not used (%s), and %s was not found; using the host "
                           "monitor (no NPU readings)", exc, smi_path)
            return HostMonitor()
    if backend == "smi":
        if smi is None:
            raise DeviceUnavailableError(f"{smi_path} was not found; set device.smi_path")
        return smi
    return HostMonitor()
