"""A real Mosquitto on a free loopback port, for tests: start, stop, restart on the same port."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_ports = random.Random()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    A client that reconnects while its broker is down is given an ephemeral source port; if that
    port is the broker's own, the socket connects to itself (TCP simultaneous open) and holds the
    port in TIME-WAIT for a minute, so the broker cannot start again. Below the range that cannot
    happen.
    """
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = _ports.randrange(10000, max(10001, low))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


class MosquittoBroker:
    """One ``mosquitto -c conf`` process; ``restart`` keeps the port so clients reconnect to it."""

    def __init__(self, workdir: Path, port: int | None = None, *, persistent: bool = False) -> None:
        self.persistent = persistent  # sessions and queued messages survive a restart, as in production
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        keep = (f"persistence true\npersistence_location {self.workdir}/\n" if self.persistent
                else "persistence false\n")
        if self.persistent and os.geteuid() == 0:  # as root it would switch to 'mosquitto' and not write here
            keep += "user root\n"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{keep}"
            "log_dest stderr\nlog_type error\nlog_type warning\n"
        )
        log = self.log.open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}\n{self._holders()}")
            if port_open(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not open port {self.port}")

    def _holders(self) -> str:
        """Sockets on the broker's port, for the error message."""
        ss = subprocess.run(["ss", "-tanp"], capture_output=True, text=True, check=False).stdout
        return "\n".join(line for line in ss.splitlines() if f":{self.port} " in line)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        deadline = time.monotonic() + 5
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None
