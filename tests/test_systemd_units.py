"""The systemd units: systemd-analyze finds nothing to say, and the settings the appliance relies on."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"
ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def verify(unit: Path, unit_path: Path | None = None) -> str:
    env = {"PATH": "/usr/bin:/bin", **({"SYSTEMD_UNIT_PATH": f"{unit_path}:"} if unit_path else {})}
    done = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, env=env,
                          check=False)
    failed = "" if done.returncode == 0 else f" (exit {done.returncode})"
    return (done.stdout + done.stderr).strip() + failed


def read_unit(path: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_the_appliance_unit_verifies_cleanly(tmp_path: Path) -> None:
    text = (UNITS / "appliance.service").read_text()
    # verify insists that ExecStart exists: point it at this checkout's command.
    command = str(Path(sys.executable).with_name("appliance"))
    local = text.replace("/opt/appliance/.venv/bin/appliance", command)
    (tmp_path / "appliance.service").write_text(local)
    assert verify(tmp_path / "appliance.service") == ""


def test_the_appliance_unit_keeps_the_promises_of_the_design() -> None:
    unit = read_unit(UNITS / "appliance.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) >= 10, "sd_notify watchdog"
    assert service["Restart"] == "always" and service["User"] == "appliance"
    assert "appliance run" in service["ExecStart"]
    assert "mosquitto.service" in unit["Unit"]["After"] and "network-online.target" in unit["Unit"]["After"]
    assert int(unit["Unit"]["StartLimitBurst"]) >= 3, "no endless crash loop"
    assert service.get("PrivateDevices", "no") == "no", "the card's /dev/axcl* must stay reachable"
    assert "/usr/lib/axcl" in service["Environment"]


def test_the_mosquitto_drop_in_verifies_with_debians_unit(tmp_path: Path) -> None:
    shutil.copy("/lib/systemd/system/mosquitto.service", tmp_path / "mosquitto.service")  # Debian's own
    (tmp_path / "mosquitto.service.d").mkdir()
    drop_in_file = UNITS / "mosquitto.service.d/appliance.conf"
    shutil.copy(drop_in_file, tmp_path / "mosquitto.service.d/appliance.conf")
    assert verify(tmp_path / "mosquitto.service", unit_path=tmp_path) == ""
    drop_in = read_unit(drop_in_file)
    assert "/etc/mosquitto/appliance/mosquitto.conf" in drop_in["Service"]["ExecStart"]


def test_the_display_unit_verifies_and_opens_a_display_page_in_kiosk_mode() -> None:
    path = UNITS / "appliance-display.service"
    assert verify(path) == ""
    unit = read_unit(path)
    service = unit["Service"]
    assert "/display/" in service["Environment"] and "--kiosk" in service["ExecStart"]
    assert "--user-data-dir=%h/" in service["ExecStart"], "a kept profile keeps the key the page stored"
    assert service["Restart"] == "always" and unit["Install"]["WantedBy"] == "graphical-session.target"


def test_a_percent_in_the_display_address_needs_the_env_file_or_a_doubled_percent(tmp_path: Path) -> None:
    """systemd expands specifiers in a drop-in's Environment= (a bare %20 is dropped with a
    warning), not in an EnvironmentFile; INSTALL.md's override example must verify cleanly."""
    service = read_unit(UNITS / "appliance-display.service")["Service"]
    assert service["EnvironmentFile"] == "-%h/.config/appliance-display.env"
    shutil.copy(UNITS / "appliance-display.service", tmp_path)
    drop_in = tmp_path / "appliance-display.service.d"
    drop_in.mkdir()

    def verify_with(line: str) -> str:
        (drop_in / "override.conf").write_text(f"[Service]\n{line}\n")
        return verify(tmp_path / "appliance-display.service", unit_path=tmp_path)

    bare = verify_with("Environment=APPLIANCE_DISPLAY_URL=http://pi:8000/display/north?text=Gallery%20North")
    assert "Failed to resolve specifiers" in bare
    install = (ROOT / "docs/INSTALL.md").read_text()
    documented = re.findall(r"Environment=APPLIANCE_DISPLAY_URL=[^`\s]+", install)
    assert documented and any("%%" in line for line in documented)
    for line in documented:
        assert verify_with(line) == "", line
