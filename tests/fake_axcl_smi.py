#!/usr/bin/env python3
"""A stand-in for AXERA's ``axcl-smi``, printing its real formats; steered by environment variables.

FAKE_SMI_MODE: ok (default) | garbage | busy | hang | dead | busy_once (busy on the first call only,
using FAKE_SMI_STATE as a marker file). FAKE_SMI_TEMP: the card's temperature in whole degrees C.

FAKE_AXCL_STATE: the simulated cards shared with the fake pyaxcl (``tests/fake_axcl.py``). Without
it there is one healthy card, index 0 with device id 1 (bus ``0001:01:00.0``), as on a Pi 5. With
it, the table lists every card that is not rebooting or dead, ``info ... -d N`` prints card N's
``Device ID`` (its bus number) first, and ``reboot -d N`` (N a card index, SDK >= V2.26) reboots
card N in the shared state and records the call and its answer.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fake_axcl import ENV, CardStore

RULE = "+" + "-" * 96 + "+\n"
HEADER = RULE + """\
| AXCL-SMI  V3.6.4_20250822020158                                  Driver  V3.6.4_20250822020158 |
+-----------------------------------------+--------------+---------------------------------------+
| Card  Name                     Firmware | Bus-Id       |                          Memory-Usage |
| Fan   Temp                Pwr:Usage/Cap | CPU      NPU |                             CMM-Usage |
|=========================================+==============+=======================================|
+-----------------------------------------+--------------+---------------------------------------+
"""
ROW = """\
|    {index}  AX650N                     V3.6.4 | 0001:{bus}:00.0 |                158 MiB /      945 MiB |
|   --   {temp}C                      -- / -- | 3%        41% |                 18 MiB /     7040 MiB |
+-----------------------------------------+--------------+---------------------------------------+
"""
PROCESSES = """
+------------------------------------------------------------------------------------------------+
| Processes:                                                                                     |
| Card      PID  Process Name                                                   NPU Memory Usage |
|================================================================================================|
|    0    84643  /home/axera/samples/qwen3-4b/main_axcl_aarch64                      4894032 KiB |
+------------------------------------------------------------------------------------------------+
"""
EMPTY = HEADER + RULE
DEFAULT_CARD = {"id": 1, "state": "ok", "temp_c": 52, "heals": True}


def cards(store):
    if store is None:
        return [dict(DEFAULT_CARD)]
    return store.cards()


def summary(cards_now):
    up = [(i, c) for i, c in enumerate(cards_now) if c["state"] in ("ok", "hung")]
    if not up:
        return EMPTY
    temp = os.environ.get("FAKE_SMI_TEMP")
    rows = "".join(ROW.format(index=i, bus=f"{c['id']:02x}", temp=temp or c["temp_c"]) for i, c in up)
    return HEADER + rows + PROCESSES


def option(args, name):
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def info(args, cards_now):
    index = int(option(args, "-d") or 0)
    if index >= len(cards_now) or cards_now[index]["state"] not in ("ok", "hung"):
        print(f"device {index} is not found")
        return 1
    card = cards_now[index]
    print(f"Device ID           : {card['id']} ({card['id']:#x})")
    if "--temp" in args:
        temp = os.environ.get("FAKE_SMI_TEMP")
        print(f"temperature         : {int(temp) * 1000 if temp else card['temp_c'] * 1000 + 263}")
    if "--cmm" in args:
        print("CMM Total           :  7208960 KiB\nCMM Used            :    18876 KiB\n"
              "CMM Remain          :  7190084 kiB")
    if "--npu" in args:
        print("NPU Usage (%)       : 41%")
    if "--cpu" in args:
        print("CPU Usage (%)       : 3.00%")
    return 0


def reboot(args, store, mode):
    index = int(option(args, "-d") or 0)
    answer = input(f"Do you want to reboot device {index} ? (y/n): ")
    if store is not None:
        store.record("smi_calls", {"args": args, "answer": answer.strip()})
    if answer.strip() != "y":
        print("canceled")
        return 1
    if mode == "dead":
        print(f"reboot device {index} failed")
        return 1
    if store is not None:
        if index >= len(store.cards()):
            print(f"device {index} is not found")
            return 1
        if not store.reboot(index):
            print(f"reboot device {index} failed")
            return 1
    print(f"reboot device {index} success")
    return 0


def main() -> int:
    mode = os.environ.get("FAKE_SMI_MODE", "ok")
    marker = os.environ.get("FAKE_SMI_STATE", "")
    store = CardStore(os.environ[ENV]) if os.environ.get(ENV) else None
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
        return reboot(args, store, mode)
    if mode == "dead":
        print(EMPTY)
        return 0
    if args[:1] == ["info"]:
        return info(args, cards(store))
    print(summary(cards(store)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
