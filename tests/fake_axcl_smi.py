#!/usr/bin/env python3
"""A stand-in for AXERA's ``axcl-smi``, printing its real formats; steered by environment variables.

FAKE_SMI_MODE: ok (default) | garbage | busy | hang | dead | busy_once (busy on the first call only,
using FAKE_SMI_STATE as a marker file). FAKE_SMI_TEMP: the card's temperature in whole degrees C.
"""

import os
import sys
import time

RULE = "+" + "-" * 96 + "+\n"
SUMMARY = RULE + """\
| AXCL-SMI  V3.6.4_20250822020158                                  Driver  V3.6.4_20250822020158 |
+-----------------------------------------+--------------+---------------------------------------+
| Card  Name                     Firmware | Bus-Id       |                          Memory-Usage |
| Fan   Temp                Pwr:Usage/Cap | CPU      NPU |                             CMM-Usage |
|=========================================+==============+=======================================|
+-----------------------------------------+--------------+---------------------------------------+
|    0  AX650N                     V3.6.4 | 0001:01:00.0 |                158 MiB /      945 MiB |
|   --   {temp}C                      -- / -- | 3%        41% |                 18 MiB /     7040 MiB |
+-----------------------------------------+--------------+---------------------------------------+

+------------------------------------------------------------------------------------------------+
| Processes:                                                                                     |
| Card      PID  Process Name                                                   NPU Memory Usage |
|================================================================================================|
|    0    84643  /home/axera/samples/qwen3-4b/main_axcl_aarch64                      4894032 KiB |
+------------------------------------------------------------------------------------------------+
"""
EMPTY = SUMMARY.split("|    0  AX650N")[0] + "+" + "-" * 96 + "+\n"


def main() -> int:
    mode = os.environ.get("FAKE_SMI_MODE", "ok")
    marker = os.environ.get("FAKE_SMI_STATE", "")
    if mode == "busy_once" and marker and not os.path.exists(marker):
        open(marker, "w").close()
        mode = "busy"
    if mode == "busy":
        print("axcl-smi is already running, please try later")
        return 1
    if mode == "hang":
        time.sleep(60)
    if mode == "garbage":
        print("Segmentation fault (core dumped)\n\x00\x01 ???")
        return 139
    args = sys.argv[1:]
    if args[:1] == ["reboot"]:
        answer = input(f"Do you want to reboot device {args[-1]} ? (y/n): ")
        if answer.strip() != "y":
            print("canceled")
            return 1
        if mode == "dead":
            print(f"reboot device {args[-1]} failed")
            return 1
        print(f"reboot device {args[-1]} success")
        return 0
    if mode == "dead":
        print(EMPTY)
        return 0
    print(SUMMARY.replace("{temp}", os.environ.get("FAKE_SMI_TEMP", "52")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
