"""Fetch catalog models into ``models/``: download, assemble the bundle, verify it, say what to configure.

Downloads land in ``models/.hub/<owner>--<name>/<revision>/`` (resumable, kept for a re-run). The
bundle ``models/<id>/`` links to the compiled files there (relative links, so the models folder can
move) and holds its own ``config.json`` and tokenizer files. It is assembled in a temporary folder
and renamed into place only once verified, so a running appliance never sees half a bundle.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from appliance.fetch.catalog import CatalogEntry, ChatSource, ImageSource, RepoFiles, SpeechSource
from appliance.fetch.hub import HubClient
from appliance.fetch.layout import (
    bundle_config,
    chat_compiled_files,
    chat_problems,
    image_compiled_files,
    repo_path,
)
from npu.diffusion.bundle import find_files
from npu.staged_folder import staged_folder

logger = logging.getLogger(__name__)

SOURCE_FILE = "SOURCE.json"


class BundleIncomplete(RuntimeError):
    pass


def download_dir(models_dir: Path, source: RepoFiles) -> Path:
    return models_dir / ".hub" / source.repo.replace("/", "--") / source.revision


def fetch(entry: CatalogEntry, models_dir: Path, hub: HubClient) -> Path:
    """Download and assemble ``entry`` as ``models_dir/<id>``; returns the bundle folder."""
    started = time.monotonic()
    bundle = models_dir / entry.id
    with staged_folder(bundle) as staging:
        if isinstance(entry.source, ChatSource):
            _assemble_chat(entry.source, models_dir, staging, hub)
        elif isinstance(entry.source, SpeechSource):
            _assemble_speech(entry.source, models_dir, staging, hub)
        else:
            _assemble_image(entry.source, models_dir, staging, hub)
        (staging / SOURCE_FILE).write_text(json.dumps(_provenance(entry), indent=2) + "\n", encoding="utf-8")
    logger.info("%s ready in %s (%.0f s)", entry.id, bundle, time.monotonic() - started)
    return bundle


def _assemble_chat(source: ChatSource, models_dir: Path, staging: Path, hub: HubClient) -> None:
    upstream = download_dir(models_dir, source.upstream)
    hub.download(source.upstream, [repo_path(source.upstream.folder, f) for f in source.upstream_files],
                 upstream)
    up = upstream / source.upstream.folder
    config = _read_json(up / "config.json")
    generation_file = up / "generation_config.json"
    generation = _read_json(generation_file) if generation_file.is_file() else None
    merged = bundle_config(config, generation)
    layers = int(merged.get("num_hidden_layers", 0))
    if layers <= 0:
        raise BundleIncomplete(f"{source.upstream.repo}'s config.json gives no num_hidden_layers")
    compiled = download_dir(models_dir, source.compiled)
    files = chat_compiled_files(source, layers)
    hub.download(source.compiled, files, compiled)
    for repo_file in files:
        _link(staging / Path(repo_file).name, compiled / repo_file)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(up / name, staging / name)
    (staging / "config.json").write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    problems = chat_problems(staging, merged, source.prefix)
    if problems:
        raise BundleIncomplete(f"{source.compiled.repo}: " + "; ".join(problems))


def _assemble_image(source: ImageSource, models_dir: Path, staging: Path, hub: HubClient) -> None:
    compiled = download_dir(models_dir, source.compiled)
    files = image_compiled_files(source)
    hub.download(source.compiled, files, compiled)
    for name, repo_file in zip(source.files, files, strict=True):
        _link(staging / name, compiled / repo_file)
    try:
        find_files(staging, ".axmodel")  # the layout the pipeline loads
    except FileNotFoundError as exc:
        raise BundleIncomplete(f"{source.compiled.repo}: {exc}") from exc


def _assemble_speech(source: SpeechSource, models_dir: Path, staging: Path, hub: HubClient) -> None:
    compiled = download_dir(models_dir, source.compiled)
    files = [repo_path(source.compiled.folder, name) for name in source.files]
    hub.download(source.compiled, files, compiled)
    for repo_file in files:
        _link(staging / Path(repo_file).name, compiled / repo_file)
    problem = speech_problem(staging, source.kind)
    if problem:
        raise BundleIncomplete(f"{source.compiled.repo}: {problem}")


def speech_problem(folder: Path, kind: str) -> str | None:
    """Why the folder is not one of AXERA's speech layouts the appliance runs, or None."""
    from npu.speech.axera_sensevoice import is_axera_sensevoice
    from npu.speech.axera_whisper import find_model_type

    if kind == "stt":
        if find_model_type(folder) is None and not is_axera_sensevoice(folder):
            return "the files are neither AXERA's Whisper nor its SenseVoice layout"
        return None
    from npu.speech.axera_kokoro import is_axera_kokoro

    return None if is_axera_kokoro(folder) else "the files are not AXERA's Kokoro layout"


def _link(link: Path, target: Path) -> None:
    """A relative symlink; the bundle is renamed later, but it stays at the same depth."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent))


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise BundleIncomplete(f"{path} is not a JSON object")
    return data


def _provenance(entry: CatalogEntry) -> dict[str, Any]:
    sources = {"compiled": entry.source.compiled.model_dump()}
    if isinstance(entry.source, ChatSource):
        sources["upstream"] = entry.source.upstream.model_dump()
    return {"id": entry.id, "title": entry.title, "kind": entry.kind, "sources": sources,
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
