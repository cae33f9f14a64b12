"""Which voice backend a tts model's folder holds, and OpenAI's voice names.

A folder with a Piper voice runs on the CPU (ONNX Runtime). OpenAI's clients name voices
(``alloy``, ``nova``...) that no installation has; each of those names means the default voice,
so an unchanged client speaks, while a name that is neither is refused with what is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from npu.speech.piper_voice import PiperVoiceRunner, find_piper_voice

OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer",
                 "verse")


def load_voice(folder: Path, runtime: str = "auto", device_id: int = 0) -> Any:
    """The voice in ``folder``, resident."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"voice folder {folder} does not exist ('appliance models demo' installs one)")
    if find_piper_voice(folder) is not None:
        return PiperVoiceRunner.load(folder)
    raise FileNotFoundError(
        f"{folder} holds no voice this appliance runs (a Piper <name>.onnx with its .json)")


def resolve_voice(voice: str | None, installed: list[str]) -> str | None:
    """The tts model a request's ``voice`` names: an installed one, or None (the default) for
    OpenAI's names and for no name. Raises ``ValueError`` naming what is installed otherwise."""
    if voice is None or voice in OPENAI_VOICES:
        return None
    if voice in installed:
        return voice
    raise ValueError(f"unknown voice {voice!r}; installed: {', '.join(installed) or 'none'} "
                     f"(OpenAI's names {', '.join(OPENAI_VOICES)} speak with the default voice)")
