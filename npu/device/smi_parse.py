"""Parsers for ``axcl-smi`` output. Pure and lenient: odd text gives unknown values and a reason.

The formats are the tool's real ones (V3.6): the summary table, and ``info --temp|--cmm|--npu|
--cpu`` key/value lines. The CMM ``Remain`` line spells ``kiB`` in lowercase; temperatures in
``info --temp`` are milli-degrees Celsius.
"""

from __future__ import annotations

import re

from npu.device.base import DeviceReading

BUSY_MARK = "already running"
_CARD_LINE = re.compile(
    r"^\|\s*(\d+)\s+(\S+)\s+(\S+)\s*\|\s*([0-9a-fA-F:.]+)\s*\|\s*(\d+)\s*MiB\s*/\s*(\d+)\s*MiB\s*\|"
)
_STATS_LINE = re.compile(
    r"^\|\s*(\S+)\s+(\d+(?:\.\d+)?)C\s+.*?\|\s*(\d+(?:\.\d+)?)%\s+(\d+(?:\.\d+)?)%\s*\|"
    r"\s*(\d+)\s*MiB\s*/\s*(\d+)\s*MiB\s*\|"
)
_KV_LINE = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")
_KIB = re.compile(r"^(\d+)\s*[kK]i?B$")
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)\s*%$")


def is_busy(text: str) -> bool:
    """The tool refuses to run while another copy runs; the caller retries."""
    return BUSY_MARK in text


def parse_summary(text: str) -> tuple[dict[int, DeviceReading], str | None]:
    """Readings per card index from the summary table, and a reason when no table was found.

    A table without card rows is a real answer (no card is up), not a parse failure.
    """
    readings: dict[int, DeviceReading] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        card = _CARD_LINE.match(line.strip())
        if card is None or i + 1 >= len(lines):
            continue
        stats = _STATS_LINE.match(lines[i + 1].strip())
        if stats is None:
            continue
        index = int(card.group(1))
        readings[index] = DeviceReading(
            device_id=index,
            source="smi",
            temperature_c=float(stats.group(2)),
            mem_used_mib=float(card.group(5)),
            mem_total_mib=float(card.group(6)),
            cpu_load_pct=float(stats.group(3)),
            npu_load_pct=float(stats.group(4)),
            cmm_used_mib=float(stats.group(5)),
            cmm_total_mib=float(stats.group(6)),
        )
    if readings or _complete_table(text):
        return readings, None
    return {}, "axcl-smi printed no card table that could be read"


def _complete_table(text: str) -> bool:
    """The header, its ``===`` rule and a closing ``+---+`` line: a whole table with no card rows."""
    return "AXCL-SMI" in text and "|====" in text and text.rstrip().endswith("+")


def parse_info(text: str) -> dict[str, str]:
    """``key : value`` lines of ``axcl-smi info ...`` as a dict (keys as printed)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        match = _KV_LINE.match(line)
        if match and match.group(1):
            out[match.group(1)] = match.group(2)
    return out


def parse_temp_info(text: str) -> float | None:
    """Degrees C from ``info --temp`` (printed in milli-degrees)."""
    raw = parse_info(text).get("temperature", "")
    return int(raw) / 1000.0 if raw.isdigit() else None


def parse_kib(value: str) -> float | None:
    """MiB from ``7208960 KiB`` (or the lowercase ``kiB`` of the Remain line)."""
    match = _KIB.match(value.strip())
    return int(match.group(1)) / 1024.0 if match else None


def parse_cmm_info(text: str) -> tuple[float | None, float | None]:
    """(total, used) CMM in MiB from ``info --cmm``."""
    info = parse_info(text)
    return parse_kib(info.get("CMM Total", "")), parse_kib(info.get("CMM Used", ""))


def parse_percent(value: str) -> float | None:
    match = _PERCENT.match(value.strip())
    return float(match.group(1)) if match else None
