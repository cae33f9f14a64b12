"""Pydantic's validation errors as sentences a person reads, the same on both front doors.

Pydantic words a validator's own message as ``"Value error, ..."`` or ``"Assertion failed, ..."``,
prefixes union branches to the path (``stop.list[str].0``) and calls an unknown field "Extra
inputs are not permitted". ``describe_errors`` is the one place that turns an error list into
``(field, sentence)`` pairs: prefixes gone, paths dotted, unknown fields named with the closest
known one (``unknown field "max_token" (did you mean "max_tokens"?)``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, get_args, get_origin

from pydantic import AfterValidator, BaseModel
from pydantic_core import PydanticCustomError

from npu.bounds import Bound

PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")
MAX_SHOWN = 64  # characters of a field name quoted back
# Union branches and validator wrappers pydantic puts in an error's path: "str", "int",
# "list[str]", "function-after[...]", "tagged-union[...]", and model names (CamelCase).
_BRANCH = re.compile(r"^(str|int|float|bool|bytes|none|[a-z-]+\[.*\]|[A-Z][A-Za-z0-9]*)$")


def bounded(bound: Bound) -> AfterValidator:
    """A pydantic validator that refuses values outside ``bound`` (its ``random`` value -> None)."""

    def check(value: Any) -> Any:
        if value is None:
            return None
        if bound.random is not None and value == bound.random and not isinstance(value, bool):
            return None
        if not bound.admits(value):
            raise PydanticCustomError("out_of_range", bound.must_be())
        return value

    return AfterValidator(check)


def clean_message(message: str) -> str:
    """A validator's own words, without the prefix pydantic adds."""
    for prefix in PYDANTIC_PREFIXES:
        if message.startswith(prefix):
            return message[len(prefix):]
    return message


def error_path(loc: Sequence[int | str], skip: int = 0) -> str:
    """The dotted field path of an error location, union branch names left out."""
    parts = [str(p) for p in loc[skip:] if isinstance(p, int) or not _BRANCH.match(str(p))]
    return ".".join(parts)


def unknown_field(path: str, known: Iterable[str]) -> str:
    """``unknown field "max_token" (did you mean "max_tokens"?)``."""
    *parent, name = path.split(".")
    shown = path if len(path) <= MAX_SHOWN else path[:MAX_SHOWN] + "..."
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f' (did you mean "{".".join([*parent, close[0]])}"?)' if close else ""
    return f'unknown field "{shown}"{hint}'


def describe_errors(
    errors: Iterable[Mapping[str, Any]], model: type[BaseModel] | None = None, skip: int = 0
) -> list[tuple[str, str]]:
    """``(field path, sentence)`` for each distinct problem, in pydantic's order.

    Args:
        model: the validated model, whose field names an unknown field is matched against.
        skip: leading location parts to drop (FastAPI's ``body``).
    """
    out: dict[str, str] = {}
    # Unknown fields first: a misspelt field also makes the one it meant "missing".
    ordered = sorted(errors, key=lambda e: e.get("type") != "extra_forbidden")
    for err in ordered:
        loc = tuple(err.get("loc", ()))
        path = error_path(loc, skip)
        if err.get("type") == "extra_forbidden":
            line = unknown_field(path, _field_names(model, loc[skip:-1]))
        else:
            message = clean_message(str(err.get("msg", "invalid")))
            line = f"{path}: {message}" if path else message
        out.setdefault(line, path)
    return [(path, line) for line, path in out.items()]


def _field_names(model: type[BaseModel] | None, parent: Sequence[int | str]) -> list[str]:
    """The fields of the model found at ``parent`` inside ``model`` (empty when unknown)."""
    current: type[BaseModel] | None = model
    for part in parent:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            continue  # a union branch name, or a key of a mapping
        current = _model_in(field.annotation)
    return list(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds, directly, optionally or as list items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:  # X | None, list[X], Annotated[X, ...]
        for arg in get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
