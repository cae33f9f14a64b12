"""The engine's listeners: its state as it changes, and the named events of its devices.

Both are called on the thread that changed something; a failing listener is logged and never
stops the engine or the other listeners.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from npu.engine.api import EngineState, EventListener, StateListener

logger = logging.getLogger(__name__)


class Listeners:
    def __init__(self, snapshot: Callable[[], EngineState]) -> None:
        self._snapshot = snapshot
        self._state: list[StateListener] = []
        self._events: list[EventListener] = []
        self._last: EngineState | None = None
        # Held while a state is computed and handed to the listeners, so the last one published is
        # always the newest (two threads notifying at once never leave an older state retained).
        self._lock = threading.RLock()

    def add_state(self, listener: StateListener) -> None:
        self._state.append(listener)

    def add_event(self, listener: EventListener) -> None:
        self._events.append(listener)

    def emit(self, name: str, fields: dict[str, Any]) -> None:
        logger.info("event %s %s", name, fields)
        for listener in list(self._events):
            try:
                listener(name, fields)
            except Exception:
                logger.exception("event listener failed")

    def notify(self, force: bool = False) -> None:
        """Hand the state to the listeners when it changed (or always, ``force``: a reconnect)."""
        with self._lock:
            state = self._snapshot()
            if state == self._last and not force:
                return
            self._last = state
            for listener in list(self._state):
                try:
                    listener(state)
                except Exception:
                    logger.exception("state listener failed")
