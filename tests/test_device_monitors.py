"""Device monitors: axcl-smi parsers on the real formats and on garbage, the smi tool through a fake
binary that prints those formats, the host monitor, the pyaxcl monitor over a simulated pyaxcl
(``tests/fake_axcl.py``: device ids are bus numbers, resets are reboots), the auto choice."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from fake_axcl import install, install_broken
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



def test_host_cpu_load_is_a_percentage_even_on_a_loaded_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A load average of 40 on two cores is not 2000 %: the figure is busy time over all cores."""
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 40.0, 40.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    live = HostMonitor()
    assert all(0.0 <= (live.read(0).cpu_load_pct or 0.0) <= 100.0 for _ in range(3))
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  300 0 100 500 100 0 0 0 50 0\ncpu0 150 0 50 250 50 0 0 0 25 0\n")
    monitor = HostMonitor(tmp_path, tmp_path / "none", stat)
    assert monitor.read(0).cpu_load_pct == 40.0, "since boot: 400 busy of 1000"
    stat.write_text("cpu  450 0 150 550 150 0 0 0 80 0\n")
    assert monitor.read(0).cpu_load_pct == 66.7, "since the last read: 200 busy of 300"
    assert monitor.read(0).cpu_load_pct == 66.7, "no tick since: the last figure holds"
    stat.write_text("not a stat file")
    assert monitor.read(0).cpu_load_pct is None

def test_axcl_monitor_without_pyaxcl_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    install_broken(monkeypatch, tmp_path, "missing")
    with pytest.raises(DeviceUnavailableError) as err:
        import_axcl()
    assert "pyaxcl" in str(err.value) and "device.backend" in str(err.value)


@pytest.mark.parametrize("ids", [[1], [1, 3]])
def test_axcl_monitor_speaks_device_ids_and_reports_card_indexes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, ids: list[int],
) -> None:
    fake = install(monkeypatch, tmp_path, ids)
    assert fake.rt.set_device(0) != 0 and fake.rt.get_device_utilization_rate(0)[3] != 0, \
        "the fake refuses a card index where a device id is due, as the runtime does"
    fake.calls.clear()
    caplog.set_level(logging.INFO, logger="npu.device.axcl")
    monitor = AxclMonitor(SmiMonitor(FAKE))
    assert monitor.ids == tuple(ids) and "card 0 = device id 1 (0x1)" in caplog.text
    for index in range(len(ids)):
        reading = monitor.read(index)
        assert reading.alive and reading.source == "axcl" and reading.device_id == index, reading
        assert reading.npu_load_pct == 63 and reading.cpu_load_pct == 7, "load from pyaxcl"
        assert reading.temperature_c == 52 and reading.cmm_total_mib == 7040, "heat and CMM from axcl-smi"
    assert fake.called("get_device_utilization_rate") == ids
    assert sorted(set(fake.called("set_device"))) == ids, "set_device gets the bus id, never the index"
    beyond = monitor.read(len(ids))
    assert not beyond.alive and f"card {len(ids)} is not on pyaxcl's device list" in (beyond.error or "")
    assert str(ids) in (beyond.error or "")
    with pytest.raises(DeviceResetError, match="not on pyaxcl's device list"):
        monitor.reset(len(ids))
    fake.store.set(0, state="dead")
    dead = monitor.read(0)
    assert not dead.alive and "device id 1" in (dead.error or "") and "0x80300181" in (dead.error or "")


def test_axcl_reset_reboots_with_axcl_smi_and_waits_for_the_runtime(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    fake = install(monkeypatch, tmp_path, [1, 3], reboot_seconds=0.4)
    monitor = AxclMonitor(SmiMonitor(FAKE), poll=0.05)
    monitor.read(0)
    fake.store.set(1, state="hung")
    started = time.monotonic()
    monitor.reset(1)
    assert time.monotonic() - started >= 0.4, "waited until the card is back on the device list"
    assert fake.store.smi_calls() == [{"args": ["reboot", "-d", "1"], "answer": "y"}], "a card index"
    assert fake.called("reset_device") == [], "axclrtResetDevice reboots nothing and is never used"
    assert fake.store.card(1)["state"] == "ok" and fake.store.card(1)["boots"] == 1
    assert fake.called("get_device_utilization_rate")[-1] == 3
    # While card 0 reboots it is off the list ([3]), and card 1 is still device id 3: the map is not
    # re-read, or card 0 would read card 1's values and card 1 would be missing.
    fake.store.set(0, state="rebooting", back_at=time.time() + 5)
    assert fake.store.listed_ids() == [3]
    during = [monitor.read(0), monitor.read(1)]
    assert not during[0].alive and "device id 1" in (during[0].error or "") and during[1].alive
    assert fake.called("get_device_utilization_rate")[-1] == 3


def test_axcl_reset_fails_clearly_without_axcl_smi_or_when_the_card_stays_dead(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    fake = install(monkeypatch, tmp_path, [1], reboot_seconds=0.1)
    with pytest.raises(DeviceResetError, match="axcl-smi was not found") as err:
        AxclMonitor(None).reset(0)
    assert "reboot -d 0" in str(err.value)
    fake.store.set(0, heals=False, state="dead")
    monitor = AxclMonitor(SmiMonitor(FAKE), poll=0.05, reset_timeout=10.0)
    with pytest.raises(DeviceResetError, match="did not succeed"):
        monitor.reset(0)  # the fake tool says the reboot failed
    fake.store.set(0, heals=True)
    monitor.reset(0)
    assert fake.called("reset_device") == []


def test_axcl_reset_gives_up_when_the_card_does_not_come_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    fake = install(monkeypatch, tmp_path, [1], reboot_seconds=30)
    monitor = AxclMonitor(SmiMonitor(FAKE), poll=0.05, reset_timeout=0.5)
    with pytest.raises(DeviceResetError, match=r"card 0 \(device id 1\) did not answer within 0.5 s"):
        monitor.reset(0)
    assert fake.called("reset_device") == []


BROKEN = {
    "missing": "pyaxcl cannot be imported",
    "no_libs": "cannot open shared object file",
    "32bit": "SystemExit",
}


@pytest.mark.parametrize("how", [*BROKEN, "init_fails", "no_card"])
def test_auto_falls_back_with_one_warning_and_a_forced_axcl_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str,
) -> None:
    fake = None
    if how in BROKEN:
        install_broken(monkeypatch, tmp_path, how)
        why = BROKEN[how]
    elif how == "init_fails":
        fake = install(monkeypatch, tmp_path, [1], init_status=0x80300181)
        why = "axcl.init(None) failed with status 0x80300181"
    else:
        fake = install(monkeypatch, tmp_path, [])
        why = "get_device_list() lists no card"
    caplog.set_level(logging.INFO)
    assert factory.make_monitor("auto", smi_path=FAKE).name == "smi"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and why in warnings[0].getMessage(), [r.getMessage() for r in warnings]
    assert "using " + FAKE in warnings[0].getMessage()
    caplog.clear()
    assert factory.make_monitor("auto", smi_path="/nonexistent/axcl-smi").name == "host"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "host monitor" in warnings[0].getMessage()
    with pytest.raises(DeviceUnavailableError) as err:
        factory.make_monitor("axcl", smi_path=FAKE)
    message = str(err.value)
    assert message.startswith("device.backend is axcl, but") and why in message
    assert "axcl-smi" in message or "pyaxcl wheel" in message, "says how to fix it"
    if fake is not None:
        assert not fake.initialised, "a runtime initialised for nothing is finalised again"


def test_auto_picks_pyaxcl_when_it_sees_a_card(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    install(monkeypatch, tmp_path, [1])
    monitor = factory.make_monitor("auto", smi_path=FAKE)
    assert monitor.name == "axcl" and monitor.read(0).alive


def test_auto_picks_smi_where_the_tool_exists_else_the_host(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    install_broken(monkeypatch, tmp_path, "missing")
    assert factory.make_monitor("auto", smi_path="/nonexistent/axcl-smi").name == "host"
    assert factory.make_monitor("auto", smi_path=FAKE).name == "smi"
    with pytest.raises(DeviceUnavailableError):
        factory.make_monitor("smi", smi_path="/nonexistent/axcl-smi")
    with pytest.raises(DeviceUnavailableError):
        factory.make_monitor("axcl")
