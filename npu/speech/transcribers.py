"""Which speech-to-text backend an stt model's folder holds.

A CTranslate2 Whisper folder runs through faster-whisper; when that is not installed (or
``runtime: pocketsphinx`` asks for it) PocketSphinx, the light fallback, transcribes with the
en-US model its package ships, as it does a folder holding a PocketSphinx model. AXERA's Whisper
and SenseVoice layouts run on the card.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from npu.runtime.factory import resolve_backend
from npu.speech.axera_sensevoice import AxSenseVoiceRunner, is_axera_sensevoice
from npu.speech.axera_whisper import AxWhisperRunner, find_model_type
from npu.speech.pocketsphinx_model import PocketSphinxRunner, is_pocketsphinx_model
from npu.speech.whisper_model import WhisperRunner, is_ctranslate2_whisper

logger = logging.getLogger(__name__)

OPENAI_STT_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
LAYOUTS = ("Whisper in CTranslate2 form: model.bin, config.json; or AXERA's <type>-encoder.axmodel, "
           "<type>-decoder.axmodel, <type>-tokens.txt, <type>_config.json; or AXERA's "
           "sensevoice.axmodel, tokens.txt, am.mvn; or a PocketSphinx model: an acoustic model "
           "folder, a .lm.bin and a .dict")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def transcriber_backend(folder: Path, runtime: str = "auto") -> tuple[str, str]:
    """The backend that transcribes with ``folder`` here and why; raises ``FileNotFoundError`` or
    ``RuntimeError`` (``BackendUnavailableError`` for a card model without the card) otherwise."""
    if not folder.is_dir():
        raise FileNotFoundError(f"speech-to-text folder {folder} does not exist "
                                "('appliance models demo' installs Whisper tiny.en)")
    sphinx = "pocketsphinx, the fallback, with its package's en-US model"
    if runtime == "pocketsphinx" or (is_pocketsphinx_model(folder) and runtime == "auto"):
        if not _installed("pocketsphinx"):
            raise RuntimeError("pocketsphinx is not installed (pip install 'appliance[speech-light]')")
        return "pocketsphinx", "pocketsphinx" + (" with the folder's model" if is_pocketsphinx_model(folder)
                                                 else " with its package's en-US model")
    if is_ctranslate2_whisper(folder):
        if _installed("faster_whisper"):
            return "ctranslate2", "Whisper through faster-whisper"
        if _installed("pocketsphinx"):
            return "pocketsphinx", f"{sphinx}: faster-whisper (the voice extra) is not installed"
        raise RuntimeError("neither faster-whisper (pip install 'appliance[voice]') nor pocketsphinx "
                           "(pip install 'appliance[speech-light]') is installed")
    if find_model_type(folder) is not None:
        return resolve_backend(folder, runtime), "AXERA's Whisper"
    if is_axera_sensevoice(folder):
        return resolve_backend(folder, runtime), "AXERA's SenseVoice"
    raise FileNotFoundError(f"{folder} holds no speech-to-text model this appliance runs ({LAYOUTS})")


def load_transcriber(folder: Path, runtime: str = "auto", device_id: int = 0) -> Any:
    backend, why = transcriber_backend(folder, runtime)
    if backend == "ctranslate2":
        return WhisperRunner.load(folder)
    if backend == "pocketsphinx":
        if "fallback" in why:
            logger.warning("speech-to-text %s: transcribed by %s", folder.name, why)
        return PocketSphinxRunner.load(folder)
    if find_model_type(folder) is not None:  # AXERA's layout: the card (or its simulated runtime)
        return AxWhisperRunner(folder, backend, device_id)
    return AxSenseVoiceRunner(folder, backend, device_id)


def resolve_stt_model(model: str | None, installed: list[str]) -> str | None:
    """OpenAI's model names (``whisper-1``...) mean the default stt model; others must be installed."""
    if model is None or model in OPENAI_STT_MODELS:
        return None
    if model in installed:
        return model
    raise ValueError(f"unknown model {model!r}; installed: {', '.join(installed) or 'none'} "
                     f"({', '.join(OPENAI_STT_MODELS)} mean the default)")
