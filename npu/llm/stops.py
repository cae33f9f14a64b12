"""Stop strings over streamed text: show text as early as possible, never a piece of a stop.

The detokenizer produces text in arbitrary pieces, and a stop string such as ``"\\nUser:"``
may arrive split over many of them. :class:`StopMatcher` holds back only the longest tail that
could still grow into a stop string and releases everything before it at once, so streamed
text is never retracted and never shows the start of a stop that later completes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)


class StopMatcher:
    """Cut a text stream at the first stop string.

    "First" is the occurrence that completes first (the one a reader going character by
    character would see); of several completing on the same character the longest wins. That
    makes the result independent of how the stream was split into pieces.

    Args:
        stop_strings: the stop strings (non-empty); none at all makes :meth:`feed` a pass-through.
    """

    __slots__ = ("_held", "_longest", "_prefixes", "_stops", "matched", "stopped")

    def __init__(self, stop_strings: Iterable[str] = ()) -> None:
        self._stops = tuple(dict.fromkeys(stop_strings))
        if any(not s for s in self._stops):
            raise ValueError("stop strings must not be empty")
        # Every proper prefix of a stop string: the tails worth holding back.
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._longest = max((len(p) for p in self._prefixes), default=0)
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    @property
    def held(self) -> str:
        """Text received but not released yet because it may begin a stop string."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the next piece; return the text safe to show now and whether a stop matched.

        On a match only the text before the stop string is returned, and the matcher stays
        stopped: later calls return ``("", True)``.
        """
        if self.stopped:
            return "", True
        buffer = self._held + text
        found = self._first_match(buffer)
        if found is not None:
            start, stop = found
            self._held = ""
            self.stopped = True
            self.matched = stop
            return buffer[:start], True
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """End of stream without a stop: release the held-back tail."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buffer.find(stop)
            if start < 0:
                continue
            candidate = (start + len(stop), start, stop)
            if best is None or candidate < best:
                best = candidate
        return None if best is None else (best[1], best[2])

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of a stop string."""
        for size in range(min(len(buffer), self._longest), 0, -1):
            if buffer[-size:] in self._prefixes:
                return size
        return 0
