"""The ``models:`` entries of ``appliance.yaml`` for fetched bundles, merged into an existing file.

Only the ``models:`` block is rewritten: comments and keys elsewhere in the file stay as the
installer wrote them. Entries are matched by ``id``; a fetched model replaces an entry of the same
id and is appended otherwise.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_TOP_KEY = re.compile(r"^[A-Za-z_][\w-]*\s*:")


def model_entry(model_id: str, kind: str, path: str, *, default: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": model_id, "kind": kind, "path": path, "runtime": "auto"}
    if default:
        entry["default"] = True
    return entry


def merge_models(text: str, entries: list[dict[str, Any]]) -> str:
    """``text`` (a YAML config) with ``entries`` in its ``models:`` list."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"the config file is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("the config file is not a YAML mapping")
    models = list(data.get("models") or [])
    for entry in entries:
        if entry.get("default"):  # one default per kind: the new one takes over
            for m in models:
                if isinstance(m, dict) and m.get("kind", "chat") == entry["kind"]:
                    m.pop("default", None)
        ids = [m.get("id") if isinstance(m, dict) else None for m in models]
        index = ids.index(entry["id"]) if entry["id"] in ids else None
        if index is None:
            models.append(entry)
        else:
            models[index] = entry
    block = yaml.safe_dump({"models": models}, sort_keys=False, default_flow_style=False)
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^models\s*:", line)), None)
    if start is None:
        return text + ("" if text.endswith("\n") or not text else "\n") + "\n" + block
    end = next((i for i in range(start + 1, len(lines)) if _TOP_KEY.match(lines[i])), len(lines))
    while end > start + 1 and lines[end - 1].strip() == "":
        end -= 1
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + block + ("\n" + tail if tail else "")
