"""systemd's notify protocol (READY, WATCHDOG, STOPPING): a datagram to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` with ``WatchdogSec=``, systemd restarts the appliance when the main loop
stops pinging, which catches a frozen process that no in-process watchdog could. Outside systemd
the variable is unset and every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send one message (e.g. ``"WATCHDOG=1"``); ``False`` when not under systemd or on error."""
    address = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("sd_notify %s failed: %s", message, exc)
        return False
    return True


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Half of systemd's watchdog period in seconds (how often to ping), or ``None`` if unset."""
    usec = (env if env is not None else os.environ).get("WATCHDOG_USEC")
    try:
        return int(usec) / 2e6 if usec else None
    except ValueError:
        return None
