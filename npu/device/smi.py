"""The ``axcl-smi`` monitor: readings from the summary table, resets with ``axcl-smi reboot``.

``-d N`` and the table's ``Card`` column are card indexes (SDK V2.26 on), the numbering the whole
appliance uses; ``info`` commands print the card's device id (its PCIe bus number) first.

The tool refuses to run twice at once, so calls are serialised behind one lock and retried when
it says it is already running. Every call has a timeout. Failures give a reading with ``error``
set (warned about once per kind of failure, not every few seconds forever), never an exception.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from npu.device.base import DeviceReading, DeviceResetError
from npu.device.smi_parse import is_busy, parse_summary

logger = logging.getLogger(__name__)

Runner = Callable[..., subprocess.CompletedProcess[str]]
BUSY_RETRIES = 5
BUSY_PAUSE = 0.2


class SmiMonitor:
    name = "smi"

    def __init__(self, path: str = "axcl-smi", timeout: float = 5.0, runner: Runner = subprocess.run,
                 reset_timeout: float = 60.0, poll: float = 1.0) -> None:
        self.path = path
        self.poll = poll  # seconds between looks at a rebooting card
        self.timeout = timeout
        self.runner = runner
        self.reset_timeout = reset_timeout
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def _run(self, args: Sequence[str], stdin: str | None = None, timeout: float | None = None) -> str:
        """The tool's output; raises ``OSError`` or ``subprocess.TimeoutExpired``."""
        for attempt in range(BUSY_RETRIES):
            with self._lock:
                done = self.runner([self.path, *args], input=stdin, capture_output=True, text=True,
                                   timeout=timeout or self.timeout, check=False)
            text = (done.stdout or "") + (done.stderr or "")
            if not is_busy(text) or attempt == BUSY_RETRIES - 1:
                return text
            time.sleep(BUSY_PAUSE)
        return ""  # pragma: no cover - the loop always returns

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s (further failures of this kind are not logged)", message)

    def read(self, device_id: int) -> DeviceReading:
        try:
            text = self._run([])
        except subprocess.TimeoutExpired:
            error = f"{self.path} did not answer within {self.timeout:g} s"
            self._warn_once("timeout", error)
            return DeviceReading(device_id, "smi", error=error)
        except OSError as exc:
            error = f"{self.path} could not run: {exc}"
            self._warn_once("oserror", error)
            return DeviceReading(device_id, "smi", error=error)
        if is_busy(text):
            return DeviceReading(device_id, "smi", error=f"{self.path} stayed busy")
        readings, reason = parse_summary(text)
        if reason is not None:
            self._warn_once("parse", f"{reason}: {text[:200]!r}")
            return DeviceReading(device_id, "smi", error=reason)
        reading = readings.get(device_id)
        if reading is None:
            return DeviceReading(device_id, "smi", alive=False,
                                 error=f"card {device_id} is missing from {self.path}'s table")
        self._warned.discard("parse")
        return reading

    def reboot(self, device_id: int) -> None:
        """``axcl-smi reboot -d N`` (N is the card index), answering its y/n question with ``y``.

        Returns once the tool says ``success``; the card is then still booting. Raises
        ``DeviceResetError`` when the tool cannot run, times out, or does not say success.
        """
        try:
            text = self._run(["reboot", "-d", str(device_id)], stdin="y\n", timeout=self.reset_timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeviceResetError(f"{self.path} reboot -d {device_id} failed: {exc}") from exc
        if "success" not in text:
            said = text.strip()[:200]
            raise DeviceResetError(f"{self.path} reboot -d {device_id} did not succeed: {said!r}")
        logger.warning("card %d: rebooted with %s reboot -d %d", device_id, self.path, device_id)

    def reset(self, device_id: int) -> None:
        """Reboot the card, then wait until ``axcl-smi`` lists it again with a temperature."""
        self.reboot(device_id)
        deadline = time.monotonic() + self.reset_timeout
        while time.monotonic() < deadline:
            reading = self.read(device_id)
            if reading.alive and reading.temperature_c is not None:
                return
            time.sleep(self.poll)
        limit = self.reset_timeout
        raise DeviceResetError(f"card {device_id} did not answer within {limit:g} s of its reboot")

    def before_step(self, device_id: int) -> None:
        return None

    def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "path": self.path}
