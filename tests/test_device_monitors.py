"""Device monitors: axcl-smi parsers on the real formats and on garbage, the smi tool through a fake
binary that prints those formats, the host monitor, the pyaxcl monitor's absence, the auto choice."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from npu.device import factory
from npu.device.axcl import AxclMonitor, import_axcl
from npu.device.base import DeviceResetError, DeviceUnavailableError
from npu.device.host import HostMonitor
from npu.device.smi import SmiMonitor
from npu.device.smi_parse import (
    parse_cmm_info,
    parse_info,
    parse_kib,
    parse_percent,
    parse_summary,
    parse_temp_info,
)

FAKE = str(Path(__file__).with_name("fake_axcl_smi.py"))
SUMMARY = subprocess.run([FAKE], capture_output=True, text=True, check=True, env={**os.environ,
                         "FAKE_SMI_MODE": "ok"}).stdout.replace("3%        41%", "0%        0%")
CMM = """Device ID           : 1 (0x1)
CMM Total           :  7208960 KiB
CMM Used            :    18876 KiB
CMM Remain          :  7190084 kiB
"""


def test_summary_table_of_a_real_card() -> None:
    readings, reason = parse_summary(SUMMARY)
    assert reason is None and list(readings) == [0]
    r = readings[0]
    assert (r.temperature_c, r.mem_used_mib, r.mem_total_mib) == (52.0, 158.0, 945.0)
    assert (r.cmm_used_mib, r.cmm_total_mib, r.cmm_free_mib) == (18.0, 7040.0, 7022.0)
    assert (r.cpu_load_pct, r.npu_load_pct, r.alive) == (0.0, 0.0, True)


def test_info_outputs() -> None:
    total, used = parse_cmm_info(CMM)
    assert total == 7208960 / 1024 and used == 18876 / 1024
    assert parse_kib("7190084 kiB") == 7190084 / 1024, "the Remain line spells kiB"
    assert parse_temp_info("Device ID           : 1 (0x1)\ntemperature         : 49263\n") == 49.263
    assert parse_info("NPU Usage (%)       : 0%")["NPU Usage (%)"] == "0%"
    assert parse_percent("1.00%") == 1.0 and parse_percent("n/a") is None


@given(st.text())
def test_parsers_never_raise_on_any_text(text: str) -> None:
    readings, reason = parse_summary(text)
    assert isinstance(readings, dict) and (reason is None or isinstance(reason, str))
    parse_cmm_info(text)
    parse_temp_info(text)


@pytest.mark.parametrize("text", ["", "Segmentation fault", SUMMARY[: len(SUMMARY) // 2],
                                  "temperature : hot", "CMM Total : lots"])
def test_odd_output_gives_unknown_values(text: str) -> None:
    readings, reason = parse_summary(text)
    assert readings == {} and reason
    assert parse_temp_info(text) is None and parse_cmm_info(text) == (None, None)


def smi(monkeypatch: pytest.MonkeyPatch, mode: str, **kw: Any) -> SmiMonitor:
    monkeypatch.setenv("FAKE_SMI_MODE", mode)
    return SmiMonitor(FAKE, **kw)


def test_smi_monitor_reads_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SMI_TEMP", "71")
    reading = smi(monkeypatch, "ok").read(0)
    assert reading.source == "smi" and reading.temperature_c == 71.0 and reading.npu_load_pct == 41.0
    assert reading.error is None


def test_smi_monitor_survives_garbage_timeouts_and_a_missing_tool(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = smi(monkeypatch, "garbage")
    for _ in range(3):
        reading = garbage.read(0)
        assert reading.temperature_c is None and reading.error and reading.alive
    assert caplog.text.count("no card table") == 1, "warned once, not at every health check"
    started = time.monotonic()
    hung = smi(monkeypatch, "hang", timeout=0.5).read(0)
    assert time.monotonic() - started < 5 and "did not answer" in (hung.error or "")
    missing = SmiMonitor("/nonexistent/axcl-smi").read(0)
    assert missing.error and "could not run" in missing.error


def test_smi_monitor_retries_while_the_tool_is_busy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FAKE_SMI_STATE", str(tmp_path / "once"))
    reading = smi(monkeypatch, "busy_once").read(0)
    assert reading.temperature_c == 52.0
    busy = smi(monkeypatch, "busy").read(0)
    assert busy.temperature_c is None and "busy" in (busy.error or "")


def test_smi_reset_answers_the_question_and_waits_for_the_card(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    real = subprocess.run

    def spy(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append([*args[1:], kw.get("input") or ""])
        return real(args, **kw)

    smi(monkeypatch, "ok", runner=spy).reset(0)
    assert calls[0] == ["reboot", "-d", "0", "y\n"]
    dead = smi(monkeypatch, "dead", reset_timeout=2)
    assert not dead.read(0).alive and "missing" in (dead.read(0).error or "")
    with pytest.raises(DeviceResetError):
        dead.reset(0)


def test_host_monitor_reads_the_hottest_zone_and_memory(tmp_path: Path) -> None:
    for i, milli in enumerate(("45000", "61250", "garbage")):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "temp").write_text(milli + "\n")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        8192000 kB\nMemFree:  100 kB\nMemAvailable:    6144000 kB\n")
    reading = HostMonitor(tmp_path, meminfo).read(0)
    assert reading.temperature_c == 61.25
    assert reading.mem_total_mib == 8000.0 and reading.mem_used_mib == 2000.0
    assert reading.cmm_free_mib is None and reading.alive
    empty = HostMonitor(tmp_path / "none", tmp_path / "none").read(0)
    assert empty.temperature_c is None and empty.error and empty.mem_total_mib is None
    HostMonitor().reset(0)  # nothing to reset: a recovery on the CPU twin only reloads


def test_axcl_monitor_without_pyaxcl_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailableError) as err:
        import_axcl()
    assert "pyaxcl" in str(err.value) and "device.backend" in str(err.value)


class FakeAxclRt:
    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.resets: list[int] = []

    def set_device(self, device_id: int) -> int:
        return self.status

    def reset_device(self, device_id: int) -> int:
        self.resets.append(device_id)
        return self.status

    def get_device_count(self) -> tuple[int, int]:
        return 1, 0

    def get_device_utilization_rate(self, device_id: int) -> tuple[int, int, int, int]:
        return 7, 63, 20, self.status


class FakeAxcl:
    def __init__(self, status: int = 0) -> None:
        self.rt = FakeAxclRt(status)

    def finalize(self) -> int:
        return 0


def test_axcl_monitor_combines_runtime_load_with_smi_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_SMI_MODE", "ok")
    monitor = AxclMonitor(SmiMonitor(FAKE), axcl=FakeAxcl())  # type: ignore[arg-type]
    reading = monitor.read(0)
    assert reading.source == "axcl" and reading.npu_load_pct == 63 and reading.temperature_c == 52.0
    monitor.reset(0)
    assert monitor.axcl.rt.resets == [0]
    broken = AxclMonitor(None, axcl=FakeAxcl(status=0x80300181))  # type: ignore[arg-type]
    assert not broken.read(0).alive and "0x80300181" in (broken.read(0).error or "")
    with pytest.raises(DeviceResetError, match="0x80300181"):
        broken.reset(0)


def test_auto_picks_smi_where_the_tool_exists_else_the_host() -> None:
    assert factory.make_monitor("auto", smi_path="/nonexistent/axcl-smi").name == "host"
    assert factory.make_monitor("auto", smi_path=FAKE).name == "smi"
    with pytest.raises(DeviceUnavailableError):
        factory.make_monitor("smi", smi_path="/nonexistent/axcl-smi")
    with pytest.raises(DeviceUnavailableError):
        factory.make_monitor("axcl")
