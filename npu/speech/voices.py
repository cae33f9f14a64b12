"""Which voice backend a tts model's folder holds, and OpenAI's voice names.

A folder with a Piper voice runs on the CPU (ONNX Runtime); when piper-tts (the GPL ``voice``
extra) is not installed, or ``runtime: espeak-ng`` asks for it, the same folder is spoken by
espeak-ng, the fallback voice, as is a folder holding ``espeak-ng.json``. OpenAI's clients name
voices (``alloy``, ``nova``...) that no installation has; each of those names means the default
voice, so an unchanged client speaks, while a name that is neither is refused with what is
installed.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from npu.runtime.base import BackendUnavailableError
from npu.runtime.factory import candidates
from npu.speech.axera_kokoro import AxKokoroRunner, is_axera_kokoro
from npu.speech.espeak_voice import EspeakVoiceRunner, espeak_program, is_espeak_voice
from npu.speech.piper_voice import PiperVoiceRunner, find_piper_voice

logger = logging.getLogger(__name__)

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
                 "verse")
TTS_RUNTIMES = ("auto", "onnx", "espeak-ng", "axcl", "axengine")  # onnx: Piper; axcl, axengine: Kokoro


def kokoro_backend(folder: Path, runtime: str) -> str:
    """The card backend for AXERA's Kokoro: its three parts are compiled for the NPU only (the
    folder's one ``.onnx`` is the harmonic model, which runs on the CPU beside them)."""
    if runtime in ("onnx", "espeak-ng"):
        raise ValueError(f"AXERA's Kokoro runs on the card (runtime auto, axcl or axengine), not {runtime}")
    card = [b for b in candidates(folder, runtime) if b != "onnx"]
    if not card:
        raise BackendUnavailableError(f"{folder} is AXERA's Kokoro, compiled for the card, and the "
                                      "NPU backend is not available here (pyaxcl, PyAXEngine or the "
                                      "AXCL runtime)")
    return card[0]


def voice_backend(folder: Path, runtime: str = "auto") -> tuple[str, str]:
    """The backend that speaks ``folder`` here (``piper`` or ``espeak-ng``) and why; raises
    ``FileNotFoundError`` or ``RuntimeError`` saying what is missing."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"voice folder {folder} does not exist ('appliance models demo' installs one)")
    if runtime not in TTS_RUNTIMES:
        raise ValueError(f"runtime {runtime!r} cannot speak; a tts model takes {', '.join(TTS_RUNTIMES)}")
    if is_axera_kokoro(folder):
        return kokoro_backend(folder, runtime), "AXERA's Kokoro on the card, espeak-ng's phonemes"
    piper = find_piper_voice(folder) is not None
    if runtime in ("axcl", "axengine"):
        raise ValueError(f"runtime {runtime} speaks AXERA's Kokoro only; {folder} is not one")
    if not piper and not is_espeak_voice(folder):
        raise FileNotFoundError(f"{folder} holds no voice this appliance runs (a Piper <name>.onnx with "
                                "its .json, an espeak-ng.json, or AXERA's Kokoro)")
    if piper and runtime != "espeak-ng":
        if importlib.util.find_spec("piper") is not None:
            return "piper", "Piper on ONNX Runtime"
        if runtime == "onnx":
            raise RuntimeError("piper-tts is not installed (pip install 'appliance[voice]'; it is GPL-3.0)")
        why = "espeak-ng, the fallback: piper-tts (the voice extra) is not installed"
    else:
        why = "espeak-ng" + (" (runtime espeak-ng)" if piper else "")
    if espeak_program() is None:
        raise RuntimeError("espeak-ng is not installed (apt install espeak-ng)"
                           + ("" if not piper else ", nor piper-tts (pip install 'appliance[voice]')"))
    return "espeak-ng", why


def load_voice(folder: Path, runtime: str = "auto", device_id: int = 0) -> Any:
    """The voice in ``folder``, resident."""
    backend, why = voice_backend(folder, runtime)
    if is_axera_kokoro(folder):
        return AxKokoroRunner(folder, backend, device_id)
    if backend == "piper":
        return PiperVoiceRunner.load(folder)
    if "fallback" in why:
        logger.warning("voice %s: spoken by %s", folder.name, why)
    return EspeakVoiceRunner.load(folder)


def resolve_voice(voice: str | None, installed: list[str]) -> str | None:
    """The tts model a request's ``voice`` names: an installed one, or None (the default) for
    OpenAI's names and for no name. Raises ``ValueError`` naming what is installed otherwise."""
    if voice is None or voice in OPENAI_VOICES:
        return None
    if voice in installed:
        return voice
    raise ValueError(f"unknown voice {voice!r}; installed: {', '.join(installed) or 'none'} "
                     f"(OpenAI's names {', '.join(OPENAI_VOICES)} speak with the default voice)")
