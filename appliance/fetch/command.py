"""``appliance models fetch``: the catalog, the downloads and the config entries, for an installer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from appliance.fetch.catalog import CATALOG, CatalogEntry, find_entry
from appliance.fetch.config_entries import merge_models, model_entry
from appliance.fetch.fetcher import SOURCE_FILE, fetch
from appliance.fetch.hub import HubClient


def catalog_table(models_dir: Path) -> str:
    rows = []
    for entry in CATALOG:
        present = "fetched" if (models_dir / entry.id / SOURCE_FILE).is_file() else "-"
        compiled = entry.source.compiled
        rows.append(f"{entry.id:<24} {entry.kind:<6} {present:<8} {entry.title}\n"
                    f"{'':<24} {compiled.repo}@{compiled.revision[:12]}; {entry.note}")
    return "\n".join(rows)


def entry_path(bundle: Path, config_file: Path | None) -> str:
    """The ``path:`` to write: relative to the config's folder when the bundle lies under it."""
    bundle = bundle.resolve()
    if config_file is not None:
        base = config_file.resolve().parent
        if bundle.is_relative_to(base):
            return str(bundle.relative_to(base))
    return str(bundle)


def run_fetch(ids: list[str], models_dir: Path, config_file: Path | None, default: str | None,
              hub: HubClient | None = None) -> str:
    """Fetch ``ids``; update ``config_file`` if given; returns the YAML entries for the models."""
    entries: list[CatalogEntry] = [find_entry(i) for i in ids]
    if default is not None and default not in ids:
        raise ValueError(f"--default {default!r} is not one of the models being fetched")
    text = ""
    if config_file is not None and config_file.is_file():
        text = config_file.read_text(encoding="utf-8")
    merge_models(text, [])  # a config that cannot take the entries is refused before any download
    hub = hub or HubClient()
    hub.executable()  # say that the CLI is missing before anything is downloaded
    written = []
    for entry in entries:
        bundle = fetch(entry, models_dir, hub)
        written.append(model_entry(entry.id, entry.kind, entry_path(bundle, config_file),
                                   default=entry.id == default))
    if config_file is not None:
        if text:
            shutil.copyfile(config_file, config_file.with_name(config_file.name + ".bak"))
        tmp = config_file.with_name(f".{config_file.name}.tmp")
        tmp.write_text(merge_models(text, written), encoding="utf-8")
        os.replace(tmp, config_file)
    return yaml.safe_dump({"models": written}, sort_keys=False)
