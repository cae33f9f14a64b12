"""The pyaxcl monitor: NPU and CPU load from the AXCL runtime; a hung card is rebooted by axcl-smi.

pyaxcl (``import axcl``) is installed on the Pi from AXERA's wheel, not from PyPI, and is imported
only when this monitor is built. What it promises, read in AXERA-TECH/pyaxcl:

- Its functions return an int status (0 = success) and never raise: each wraps its ctypes call in
  ``try/except`` with ``ret = -1`` returned from ``finally`` (``axcl/rt/axcl_rt_device.py:52-63``
  ``set_device``, ``:86-97`` ``reset_device``, ``:184-200`` ``get_device_list``, ``:251-263``
  ``get_device_utilization_rate``; ``axcl/axcl.py:42-56`` ``init``). The status is a C ``int32``
  (``axcl/axcl_base.py:18``), so 0x80300181 arrives negative; messages show it masked to 32 bits.
- ``set_device``, ``reset_device`` and ``get_device_utilization_rate`` take the *device id*, which
  for a PCIe card is its bus number (``axcl_rt_device.py:42-50``: 1 on a Pi 5 with one card, as
  ``axcl-smi`` prints ``Device ID : 1``), and ``get_device_list()`` returns ``(ids, ret)``
  (``:167-200``; the list is filled only when ``ret == 0``, ``:193-195``).
- The rest of the appliance speaks card *indexes* (0, 1, ...): PyAXEngine's
  ``provider_options=[{"device_id": n}]`` is an index into ``axclrtGetDeviceList``
  (``axengine/_axclrt.py:102-113``), and ``axcl-smi -d N`` takes an index from SDK V2.26 on. So this
  monitor maps index to id once, when it starts (and logs the map); it never re-reads the list to
  map, since a card that is rebooting leaves the list and would shift the others' indexes.
- ``reset_device`` (``axclrtResetDevice``) releases what ``set_device`` set up in this process
  (pyaxcl's own sample pairs them: ``sample/axclite/axclite_device.py:40`` and ``:48-51``); it
  reboots nothing, and releasing the context under live sessions would pull it from under them.
  This monitor therefore never calls it. ``reset`` reboots the card with ``axcl-smi reboot -d N``
  (the ``SmiMonitor``'s reboot) and waits until pyaxcl sees the card again.

pyaxcl does not wrap the device properties (temperature, CMM), so those come from ``axcl-smi``.
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType

from npu.device.base import DeviceReading, DeviceResetError, DeviceUnavailableError
from npu.device.smi import SmiMonitor

logger = logging.getLogger(__name__)

FIX_CARD = ("check that `axcl-smi` lists the card, that the PCIe overlay is on (dtparam=pciex1 in "
            "/boot/firmware/config.txt) and what `dmesg | grep -i axcl` says")


def status_hex(status: int) -> str:
    """An AXCL status as the SDK prints it: ``0x80300181``, not ``-2144337535``."""
    return f"{status & 0xFFFFFFFF:#x}"


def import_axcl() -> ModuleType:
    """``axcl``, initialised; ``DeviceUnavailableError`` saying which check failed and what to do."""
    try:
        import axcl  # type: ignore[import-not-found]
    except (ImportError, OSError, SystemExit) as exc:
        # ImportError: not installed; OSError: the wheel is there but /usr/lib/axcl's libraries are
        # not (axcl/lib/axcl_lib.py:44-59 loads them at import); SystemExit: a 32-bit Python
        # (axcl_lib.py:25-28 calls sys.exit).
        raise DeviceUnavailableError(
            f"pyaxcl cannot be imported ({exc!r}): install AXERA's pyaxcl wheel into the appliance's "
            "Python and the AXCL runtime (/usr/lib/axcl, the axcl .deb), or set device.backend: smi "
            "or host"
        ) from exc
    status = axcl.init(None)  # None: the runtime's default config (axcl/axcl.py:26-56, line 48)
    if status != 0:
        raise DeviceUnavailableError(
            f"axcl.init(None) failed with status {status_hex(status)}: the AXCL runtime cannot reach "
            f"the card; {FIX_CARD}; or set device.backend: smi or host"
        )
    return axcl  # type: ignore[no-any-return]


class AxclMonitor:
    """Readings and reboots per card *index*; pyaxcl is spoken to with the card's device id."""

    name = "axcl"

    def __init__(self, smi: SmiMonitor | None = None, axcl: ModuleType | None = None, *,
                 reset_timeout: float = 120.0, poll: float = 1.0) -> None:
        """``axcl``: an initialised pyaxcl (imported and initialised here when ``None``)."""
        owned = axcl is None
        self.axcl = axcl or import_axcl()
        self.smi = smi
        self.reset_timeout = reset_timeout
        self.poll = poll
        self._lock = threading.Lock()
        self._active = threading.local()  # per thread: the ids set_device was called for, by boot
        self._boots: dict[int, int] = {}  # reboots seen per device id; a reboot asks for set_device again
        try:
            self.ids = self._device_ids()
        except DeviceUnavailableError:
            if owned:
                self.close()
            raise
        mapping = ", ".join(f"card {i} = device id {d} ({d:#x})" for i, d in enumerate(self.ids))
        logger.info("pyaxcl sees %d card(s): %s", len(self.ids), mapping)
        if smi is None:
            logger.warning("axcl-smi was not found: temperatures and CMM are unknown, and a hung card "
                           "cannot be rebooted (set device.smi_path)")

    def _device_ids(self) -> tuple[int, ...]:
        ids, status = self.axcl.rt.get_device_list()
        if status != 0:
            raise DeviceUnavailableError(
                f"axcl.rt.get_device_list() failed with status {status_hex(status)}; {FIX_CARD}")
        if not ids:
            raise DeviceUnavailableError(f"axcl.rt.get_device_list() lists no card; {FIX_CARD}")
        return tuple(int(i) for i in ids)

    def device_count(self) -> int:
        return len(self.ids)

    def device_id(self, index: int) -> int | None:
        """The device id (PCIe bus number) of card ``index``, or ``None`` beyond the list."""
        return self.ids[index] if 0 <= index < len(self.ids) else None

    def _missing(self, index: int) -> str:
        return (f"card {index} is not on pyaxcl's device list (device ids {list(self.ids)}, so card "
                f"indexes 0..{len(self.ids) - 1}); check device.ids")

    def _activate(self, bus: int) -> int:
        """``set_device`` once per thread (and again after a reboot), as the runtime wants before use."""
        active: dict[int, int] = getattr(self._active, "ids", None) or {}
        self._active.ids = active
        boot = self._boots.get(bus, 0)
        if active.get(bus) == boot:
            return 0
        status = int(self.axcl.rt.set_device(bus))
        if status == 0:
            active[bus] = boot
        return status

    def read(self, device_id: int) -> DeviceReading:
        index = device_id
        bus = self.device_id(index)
        if bus is None:
            return DeviceReading(index, "axcl", alive=False, error=self._missing(index))
        base = self.smi.read(index) if self.smi is not None else DeviceReading(
            index, "axcl", error="temperature and CMM need axcl-smi, which is not available")
        with self._lock:
            status = self._activate(bus)
            cpu = npu = 0
            if status == 0:
                cpu, npu, _mem, status = self.axcl.rt.get_device_utilization_rate(bus)
        if status != 0:
            return DeviceReading(index, "axcl", alive=False, error=(
                f"card {index} (device id {bus}) does not answer (status {status_hex(status)})"))
        return DeviceReading(
            index, "axcl", temperature_c=base.temperature_c, mem_total_mib=base.mem_total_mib,
            mem_used_mib=base.mem_used_mib, cmm_total_mib=base.cmm_total_mib, cmm_used_mib=base.cmm_used_mib,
            npu_load_pct=float(npu), cpu_load_pct=float(cpu), error=base.error,
        )

    def reset(self, device_id: int) -> None:
        """Reboot card ``device_id`` (an index) with axcl-smi, then wait until pyaxcl sees it again.

        The card is back when its id is on ``get_device_list()`` again and
        ``get_device_utilization_rate`` answers 0. The caller closes the sessions on the card and
        reloads only after this returns. Raises ``DeviceResetError``.
        """
        index = device_id
        bus = self.device_id(index)
        if bus is None:
            raise DeviceResetError(self._missing(index))
        if self.smi is None:
            raise DeviceResetError(
                f"card {index} needs a reboot (axcl-smi reboot -d {index}), but axcl-smi was not found: "
                "install AXERA's axcl package or set device.smi_path (pyaxcl's reset_device only "
                "releases this process's context; it reboots nothing)")
        started = time.monotonic()
        self.smi.reboot(index)
        with self._lock:
            self._boots[bus] = self._boots.get(bus, 0) + 1
        deadline = started + self.reset_timeout
        last = "not on the device list"
        while True:
            with self._lock:
                ids, status = self.axcl.rt.get_device_list()
                listed = [int(i) for i in ids] if status == 0 else []
                # Back at its index too: PyAXEngine opens the reloaded sessions by index.
                if index < len(listed) and listed[index] == bus:
                    *_, status = self.axcl.rt.get_device_utilization_rate(bus)
                    if status == 0:
                        break
                    last = f"status {status_hex(status)}"
                else:
                    last = (f"the device list is {listed} (status {status_hex(status)}), not device id "
                            f"{bus} at index {index}")
            if time.monotonic() >= deadline:
                raise DeviceResetError(f"card {index} (device id {bus}) did not answer within "
                                       f"{self.reset_timeout:g} s of its reboot: {last}")
            time.sleep(self.poll)
        logger.info("card %d (device id %d) answers again %.1f s after its reboot", index, bus,
                    time.monotonic() - started)

    def before_step(self, device_id: int) -> None:
        return None

    def close(self) -> None:
        try:
            self.axcl.finalize()
        except Exception:  # closing must never stop a shutdown
            logger.exception("axcl.finalize failed")
