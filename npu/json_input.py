"""JSON from a client, read the same way by both front doors: standard JSON only.

``json.loads`` alone lets through what later code cannot use, or fails far from the parser: an
integer of thousands of digits raises ``ValueError`` (Python's int-string conversion limit),
``NaN`` and ``Infinity`` are not JSON at all, and a ``\\ud800`` escape (or a byte that is not
UTF-8) makes a string that cannot be encoded again, so its reply could not be sent. ``loads``
parses once and replaces each such value with an ``Invalid`` that says what is wrong, so the
caller can name the field and still read the fields that are fine (the request's id).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_INT_DIGITS = 64  # far past any field's range; Python refuses to convert past 4300 digits
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class JsonInputError(ValueError):
    """Text that cannot be read as JSON; ``syntax`` is False when it is JSON nested too deeply."""

    def __init__(self, message: str, *, syntax: bool = True) -> None:
        super().__init__(message)
        self.syntax = syntax


@dataclass(frozen=True)
class Invalid:
    """Stands in for a value that parsed but cannot be used; ``problem`` says why."""

    problem: str


def decode_utf8(raw: bytes) -> tuple[str, int | None]:
    """The text of ``raw``, and the offset of its first byte that is not UTF-8 (None: all are).

    Bad bytes are kept as surrogate escapes, so a bad byte inside a JSON string spoils only that
    string, which ``loads`` then reports by name.
    """
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", "surrogateescape"), exc.start


def loads(text: str) -> Any:
    """Parse standard JSON; values that cannot be used become ``Invalid`` (see ``first_invalid``).

    Raises ``JsonInputError`` for text that is not JSON (the parser's reason with its line and
    column) or that nests deeper than the parser can follow.
    """
    try:
        obj = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise JsonInputError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        message = "the JSON nests too deeply (keep it to a few hundred levels)"
        raise JsonInputError(message, syntax=False) from exc
    if _SURROGATE.search(text) or _SURROGATE_ESCAPE.search(text):
        obj = _mark_bad_text(obj)
    return obj


def first_invalid(obj: Any) -> tuple[str, Invalid] | None:
    """The first ``Invalid`` in document order, with its dotted path (``messages.0.content``)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, Invalid):
            return path, value
        if isinstance(value, dict):
            items = list(value.items())
        elif isinstance(value, list):
            items = list(enumerate(value))
        else:
            continue
        for key, item in reversed(items):
            stack.append((f"{path}.{key}" if path else str(key), item))
    return None


def _parse_int(digits: str) -> int | Invalid:
    count = len(digits) - digits.startswith("-")
    if count > MAX_INT_DIGITS:
        return Invalid(f"a number of {count} digits is out of range")
    return int(digits)


def _parse_float(text: str) -> float | Invalid:
    value = float(text)
    if not math.isfinite(value):
        return Invalid(f"{text[:24]} is out of range (too large for a number)")
    return value


def _constant(name: str) -> Invalid:
    return Invalid(f"{name} is not a JSON number; send a finite number")


def _encodes(text: str) -> bool:
    return _SURROGATE.search(text) is None


def _readable(text: str) -> str:
    """``text`` with each lone surrogate written as an escape, safe to show in a reply."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _mark_bad_text(obj: Any) -> Any:
    """Replace every string that is not Unicode text with ``Invalid``; keys become readable."""
    bad = Invalid("not valid UTF-8 text (a lone surrogate or a stray byte)")
    if isinstance(obj, str):
        return obj if _encodes(obj) else bad
    stack = [obj]
    while stack:
        container = stack.pop()
        if isinstance(container, dict):
            for key in [k for k in container if not _encodes(k)]:
                container[_readable(key)] = container.pop(key)
            keys: list[Any] = list(container)
        elif isinstance(container, list):
            keys = list(range(len(container)))
        else:
            continue
        for key in keys:
            value = container[key]
            if isinstance(value, str) and not _encodes(value):
                container[key] = bad
            elif isinstance(value, dict | list):
                stack.append(value)
    return obj
