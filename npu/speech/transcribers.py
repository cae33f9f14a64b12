"""Which speech-to-text backend an stt model's folder holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npu.runtime.factory import resolve_backend
from npu.speech.axera_sensevoice import AxSenseVoiceRunner, is_axera_sensevoice
from npu.speech.axera_whisper import AxWhisperRunner, find_model_type
from npu.speech.whisper_model import WhisperRunner, is_ctranslate2_whisper

OPENAI_STT_MODELS = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")


def load_transcriber(folder: Path, runtime: str = "auto", device_id: int = 0) -> Any:
    if not folder.is_dir():
        raise FileNotFoundError(f"speech-to-text folder {folder} does not exist "
                                "('appliance models demo' installs Whisper tiny.en)")
    if is_ctranslate2_whisper(folder):
        return WhisperRunner.load(folder)
    if find_model_type(folder) is not None:  # AXERA's layout: the card (or its simulated runtime)
        return AxWhisperRunner(folder, resolve_backend(folder, runtime), device_id)
    if is_axera_sensevoice(folder):
        return AxSenseVoiceRunner(folder, resolve_backend(folder, runtime), device_id)
    raise FileNotFoundError(f"{folder} holds no speech-to-text model this appliance runs (Whisper "
                            "in CTranslate2 form: model.bin, config.json; or AXERA's <type>-encoder.axmodel, "
                            "<type>-decoder.axmodel, <type>-tokens.txt, <type>_config.json; or AXERA's "
                            "sensevoice.axmodel, tokens.txt, am.mvn)")


def resolve_stt_model(model: str | None, installed: list[str]) -> str | None:
    """OpenAI's model names (``whisper-1``...) mean the default stt model; others must be installed."""
    if model is None or model in OPENAI_STT_MODELS:
        return None
    if model in installed:
        return model
    raise ValueError(f"unknown model {model!r}; installed: {', '.join(installed) or 'none'} "
                     f"({', '.join(OPENAI_STT_MODELS)} mean the default)")
