"""The device monitor the config asks for (kept light: ``appliance check`` uses it too)."""

from __future__ import annotations

from appliance.config import ApplianceConfig
from npu.device.base import DeviceMonitor
from npu.device.factory import make_monitor
from npu.device.sim import SimEvent, SimMonitor, SimState


def make_device_monitor(config: ApplianceConfig) -> DeviceMonitor:
    device = config.device
    if device.backend == "sim":
        sim = device.sim
        initial = SimState(temperature_c=sim.temperature_c, cmm_total_mib=sim.cmm_total_mib,
                           cmm_used_mib=sim.cmm_used_mib)
        return SimMonitor(initial, [SimEvent(**e.model_dump()) for e in sim.script])
    return make_monitor(device.backend, smi_path=device.smi_path)
