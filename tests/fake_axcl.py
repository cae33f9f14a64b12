"""A simulated pyaxcl (``import axcl``) over simulated AX650 cards, written from upstream's behaviour.

The cards live in a small JSON state file (path in ``FAKE_AXCL_STATE``) that this module and the
fake ``axcl-smi`` (``tests/fake_axcl_smi.py``, a separate process) share: a reboot done by the
fake tool heals the card that the fake pyaxcl sees. Each rule below follows AXERA-TECH/pyaxcl at
the line given (``git -C /work/.mirror/AXERA-TECH+pyaxcl/repo show HEAD:<file>``):

1. Functions return an int status, 0 for success, and never raise: upstream wraps each ctypes
   call in ``try/except`` and returns ``ret`` (initially -1) from ``finally``
   (``axcl/rt/axcl_rt_device.py:52-63`` set_device, ``:86-97`` reset_device, ``:153-164``
   get_device_count, ``:184-200`` get_device_list, ``:251-263`` get_device_utilization_rate;
   ``axcl/axcl.py:42-56`` init, ``:73-83`` finalize).
2. The status is a C int32 (``axcl/axcl_base.py:18`` ``axclError = c_int32``, set as restype at
   ``axcl_rt_device.py:54``), so an error such as 0x80300181 reaches Python negative. Which code
   the C library returns for each failure is not in the Python sources: the fake uses the field
   code 0x80300181 ("no connection", shared/reference/axera.md) for every refused call.
3. ``axcl.init(config)`` takes a JSON path or None (``axcl/axcl.py:26-56``, None handled at line
   48) and ``axcl.finalize()``; both are exported by the package (``axcl/__init__.py:24-25``), the
   device functions by ``axcl.rt`` (``axcl/rt/__init__.py:16-22``). Before ``init``, calls are
   refused (an assumption: the C runtime needs axclInit first, as PyAXEngine calls it at import,
   ``axengine/_axclrt.py:49-54`` and ``:69``).
4. ``get_device_count()`` returns ``(count, ret)`` (``axcl_rt_device.py:135-164``).
5. ``get_device_list()`` returns ``(ids, ret)``, the list filled only when ``ret == 0``
   (``axcl_rt_device.py:167-200``, ``:193-195``).
6. A PCIe card's device id is its bus number (``axcl_rt_device.py:42-50``): one card on a Pi 5 is
   id 1 (``0001:01:00.0``), the default here. Tests vary the ids (``[1]``, ``[1, 3]``), so the code
   under test must read what the runtime declares.
7. ``set_device(id)``, ``reset_device(id)`` and ``get_device_utilization_rate(id)`` take that id
   (``axcl_rt_device.py:26-63``, ``:66-97``, ``:230-263``); the last returns
   ``(cpu, npu, mem, ret)`` (line 263). An id that is not on the list, or a card that does not
   answer (dead, rebooting), gets a nonzero status (rule 2).
8. ``reset_device`` releases what ``set_device`` set up in this process (its docstring, line 84:
   "Active device first by set_device"; pyaxcl's sample pairs them,
   ``sample/axclite/axclite_device.py:40`` and ``:48-51``). Here it only counts down this process's
   activations: it never heals or reboots a card, and the fake counts how often it was called.
9. Importing pyaxcl loads ``/usr/lib/axcl``'s libraries (``axcl/lib/axcl_lib.py:44-59``: an
   ``OSError`` when they are missing) and exits on a 32-bit Python (``:25-28``): ``install`` with
   ``broken=`` writes a package that fails that way.
10. PyAXEngine opens a session on the card at an *index* into ``axclrtGetDeviceList``
    (``axengine/_axclrt.py:102-113``, ``RuntimeError`` past the end); ``NpuSession`` does the same.

What upstream cannot show, simulated on purpose: a card is ``ok``; ``hung`` (it still answers the
runtime's queries, but NPU work blocks until the card is rebooted, which is why the engine has a
watchdog); ``dead`` (listed, answers nothing); ``rebooting`` (off the list until ``back_at``,
then ``ok``, or ``dead`` when it does not heal). Only ``axcl-smi reboot -d N`` (N a card index,
shared/reference/axcl-smi.md) reboots a card; each reboot counts a boot, and sessions opened
before it fail. Card indexes are positions in the configured list and do not shift while a card
reboots.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

ENV = "FAKE_AXCL_STATE"
NO_CONNECTION = ctypes.c_int32(0x80300181).value  # as a c_int32 restype delivers it (rule 2)
SMI = str(Path(__file__).with_name("fake_axcl_smi.py"))


class CardStore:
    """The simulated cards, in a JSON file locked for every change (two processes use it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | Path, ids: Sequence[int] = (1,), reboot_seconds: float = 0.3) -> CardStore:
        store = cls(path)
        cards = [{"id": int(i), "state": "ok", "boots": 0, "back_at": 0.0, "heals": True,
                  "temp_c": 52, "cpu": 7, "npu": 63, "mem": 20} for i in ids]
        store.path.write_text(json.dumps({"reboot_seconds": reboot_seconds, "cards": cards,
                                          "smi_calls": [], "events": []}))
        return store

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = json.loads(self.path.read_text())
                before = json.dumps(data)
                now = time.time()
                for card in data["cards"]:  # a reboot that has run its time ends
                    if card["state"] == "rebooting" and now >= card["back_at"]:
                        card["state"] = "ok" if card["heals"] else "dead"
                yield data
                if json.dumps(data) != before:
                    tmp = self.path.with_suffix(".tmp")
                    tmp.write_text(json.dumps(data))
                    tmp.replace(self.path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # reading ----------------------------------------------------------------------------------
    def cards(self) -> list[dict[str, Any]]:
        with self._locked() as data:
            return [dict(c) for c in data["cards"]]

    def card(self, index: int) -> dict[str, Any]:
        return self.cards()[index]

    def listed_ids(self) -> list[int]:
        """What axclrtGetDeviceList would say: every card but those rebooting."""
        return [c["id"] for c in self.cards() if c["state"] != "rebooting"]

    def smi_calls(self) -> list[dict[str, Any]]:
        with self._locked() as data:
            return list(data["smi_calls"])

    def events(self) -> list[list[Any]]:
        with self._locked() as data:
            return list(data["events"])

    # changing ---------------------------------------------------------------------------------
    def set(self, index: int, **fields: Any) -> None:
        with self._locked() as data:
            data["cards"][index].update(fields)

    def record(self, key: str, entry: Any) -> None:
        with self._locked() as data:
            data[key].append(entry)

    def reboot(self, index: int) -> bool:
        """What ``axcl-smi reboot -d index`` does to the card; False when it does not heal."""
        with self._locked() as data:
            card = data["cards"][index]
            card.update(state="rebooting", back_at=time.time() + data["reboot_seconds"],
                        boots=card["boots"] + 1)
            data["events"].append(["reboot", card["id"], card["boots"]])
            return bool(card["heals"])


class FakeRt(types.ModuleType):
    """``axcl.rt``: the device functions of ``axcl/rt/axcl_rt_device.py`` (rules 1-8)."""

    def __init__(self, owner: FakeAxcl) -> None:
        super().__init__("axcl.rt")
        self._owner = owner

    def _card(self, device_id: int) -> dict[str, Any] | None:
        """The answering card with this id, or None (refused: unknown id, dead, rebooting)."""
        if not self._owner.initialised:
            return None
        for card in self._owner.store.cards():
            if card["id"] == device_id:
                return card if card["state"] in ("ok", "hung") else None
        return None

    def set_device(self, device_id: int) -> int:
        self._owner.log("set_device", device_id)
        if self._card(device_id) is None:
            return NO_CONNECTION
        self._owner.activations[device_id] = self._owner.activations.get(device_id, 0) + 1
        return 0

    def reset_device(self, device_id: int) -> int:
        self._owner.log("reset_device", device_id)
        if self._card(device_id) is None:
            return NO_CONNECTION
        self._owner.activations[device_id] = max(0, self._owner.activations.get(device_id, 0) - 1)
        return 0

    def get_device_count(self) -> tuple[int, int]:
        if not self._owner.initialised:
            return 0, NO_CONNECTION
        return len(self._owner.store.listed_ids()), 0

    def get_device_list(self) -> tuple[list[int], int]:
        if not self._owner.initialised:
            return [], NO_CONNECTION
        return self._owner.store.listed_ids(), 0

    def get_device_utilization_rate(self, device_id: int) -> tuple[int, int, int, int]:
        self._owner.log("get_device_utilization_rate", device_id)
        card = self._card(device_id)
        if card is None:
            return 0, 0, 0, NO_CONNECTION
        npu = 100 if card["state"] == "hung" else card["npu"]
        return card["cpu"], npu, card["mem"], 0


class FakeAxcl(types.ModuleType):
    """The ``axcl`` package as far as device handling goes; ``calls`` records (name, id) in order."""

    def __init__(self, store: CardStore, *, init_status: int = 0) -> None:
        super().__init__("axcl")
        self.store = store
        self.init_status = ctypes.c_int32(init_status).value
        self.initialised = False
        self.activations: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self.rt = FakeRt(self)
        self.AXCL_SUCC = 0  # axcl/__init__.py:29

    def log(self, name: str, device_id: int) -> None:
        with self._lock:
            self.calls.append((name, device_id))

    def called(self, name: str) -> list[int]:
        with self._lock:
            return [i for n, i in self.calls if n == name]

    def init(self, config: str | None) -> int:
        if self.init_status == 0:
            self.initialised = True
        return self.init_status

    def finalize(self) -> int:
        self.initialised = False
        return 0


def install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ids: Sequence[int] = (1,), *,
            reboot_seconds: float = 0.3, init_status: int = 0) -> FakeAxcl:
    """Make ``import axcl`` give a fresh fake over new cards, shared with the fake axcl-smi."""
    store = CardStore.create(tmp_path / "cards.json", ids, reboot_seconds)
    monkeypatch.setenv(ENV, str(store.path))
    fake = FakeAxcl(store, init_status=init_status)
    monkeypatch.setitem(sys.modules, "axcl", fake)
    monkeypatch.setitem(sys.modules, "axcl.rt", fake.rt)
    return fake


def install_broken(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, how: str) -> None:
    """``import axcl`` fails as upstream's does: ``missing`` (not installed), ``no_libs`` (rule 9:
    the wheel without /usr/lib/axcl), ``32bit`` (rule 9: sys.exit at import)."""
    monkeypatch.delitem(sys.modules, "axcl", raising=False)
    if how == "missing":
        monkeypatch.setitem(sys.modules, "axcl", None)  # makes `import axcl` raise ImportError
        return
    package = tmp_path / "broken" / "axcl"
    package.mkdir(parents=True)
    body = {
        "no_libs": "raise OSError('/usr/lib/axcl/libspdlog.so: cannot open shared object file: "
                   "No such file or directory')\n",
        "32bit": "import sys\nprint('pyAXCL requires a 64-bit Python interpreter.')\nsys.exit(1)\n",
    }[how]
    (package / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(package.parent))


class NpuSession:
    """A model loaded on a card the way PyAXEngine opens one (rule 10), for runner doubles.

    ``run`` is one NPU call: it fails on a card that is dead, rebooting or rebooted since the
    session opened, and blocks on a hung card until it is rebooted. Opening and closing are
    recorded in the store's events, with the card's boot count.
    """

    def __init__(self, store: CardStore, index: int, name: str = "model") -> None:
        ids = store.listed_ids()
        if index >= len(ids):
            raise RuntimeError(f"Device index {index} is out of range, total {len(ids)} device.")
        self.store = store
        self.device_id = ids[index]
        self.index = next(i for i, c in enumerate(store.cards()) if c["id"] == self.device_id)
        card = store.card(self.index)
        if card["state"] != "ok":
            raise RuntimeError(f"Set AXCL device failed 0x{NO_CONNECTION & 0xFFFFFFFF:08x}.")
        self.name = name
        self.boots = card["boots"]
        self.closed = False
        store.record("events", ["open", self.device_id, self.boots, name])

    def run(self, hang_limit: float = 30.0) -> None:
        deadline = time.monotonic() + hang_limit
        while True:
            if self.closed:
                raise RuntimeError(f"{self.name}: the session was closed")
            card = self.store.card(self.index)
            if card["boots"] != self.boots or card["state"] in ("dead", "rebooting"):
                raise RuntimeError(f"axclrtEngineExecute failed 0x{NO_CONNECTION & 0xFFFFFFFF:08x}")
            if card["state"] == "ok":
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: hung for {hang_limit:g} s (the test never rebooted it)")
            time.sleep(0.02)  # hung: the call does not return until the card is rebooted

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.store.record("events", ["close", self.device_id, self.boots, self.name])

