"""Text to speech with espeak-ng, the fallback voice: run as its own program, one sentence a step.

espeak-ng (Debian's ``espeak-ng`` package, GPL-3.0) is a separate program the appliance starts,
never a library linked into it, so the appliance stays Apache-2.0 and needs no Python package for
it. It is a formant synthesiser: robotic, but it has no model to load, starts in milliseconds and
speaks about a hundred languages. A folder is an espeak-ng voice when it holds ``espeak-ng.json``
(``{"voice": "en-us", "wpm": 175, "pitch": 50}``); a Piper folder falls back to it (with the
espeak voice its ``.onnx.json`` names) when piper-tts is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from npu.sentences import split_sentences
from npu.speech.params import Piece

CONFIG = "espeak-ng.json"
PROGRAM = "espeak-ng"
DEFAULT_WPM = 175  # espeak-ng's own default speed, words per minute
WPM_RANGE = (80, 450)  # what espeak-ng accepts; OpenAI's speed 0.25-4 is clamped to it
TIMEOUT_S = 30.0  # one sentence (at most 160 characters) takes milliseconds


def espeak_program() -> str | None:
    return shutil.which(PROGRAM)


def is_espeak_voice(folder: Path) -> bool:
    return (folder / CONFIG).is_file()


def read_settings(folder: Path) -> dict[str, object]:
    """The folder's ``espeak-ng.json``; else the espeak voice of a Piper ``.onnx.json`` in it."""
    if is_espeak_voice(folder):
        settings = json.loads((folder / CONFIG).read_text("utf-8"))
        if not isinstance(settings, dict):
            raise ValueError(f"{folder / CONFIG} must hold a JSON object")
        return settings
    for config in sorted(folder.glob("*.onnx.json")):
        voice = json.loads(config.read_text("utf-8")).get("espeak", {}).get("voice")
        if voice:
            return {"voice": voice}
    return {}


def wav_samples(data: bytes) -> tuple[bytes, int]:
    """The samples and rate of espeak-ng's WAV. On a pipe it cannot seek back to write the sizes,
    so its header claims 2 GB: read the format chunk and take everything after ``data``."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError("espeak-ng did not write a WAV")
    pos, rate = 12, 0
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if tag == b"fmt ":
            rate = int.from_bytes(data[pos + 12:pos + 16], "little")
        elif tag == b"data":
            pcm = data[pos + 8:]
            return pcm[:len(pcm) - len(pcm) % 2], rate
        pos += 8 + size
    raise RuntimeError("espeak-ng's WAV holds no samples")


class EspeakVoiceRunner:
    """espeak-ng as a voice: ``speak_steps`` runs the program once per sentence."""

    backend = "espeak-ng"

    def __init__(self, program: str, name: str, voice: str = "en-us", wpm: int = DEFAULT_WPM,
                 pitch: int = 50) -> None:
        self.program = program
        self.name = name
        self.voice = voice
        self.wpm = wpm
        self.pitch = pitch
        self.rate = 22050  # espeak-ng's output rate; checked against the first WAV it writes

    @classmethod
    def load(cls, folder: Path) -> EspeakVoiceRunner:
        program = espeak_program()
        if program is None:
            raise RuntimeError("espeak-ng is not installed (apt install espeak-ng)")
        settings = read_settings(folder)
        runner = cls(program, folder.name, str(settings.get("voice", "en-us")),
                     int(settings.get("wpm", DEFAULT_WPM)), int(settings.get("pitch", 50)))
        _, runner.rate = runner._speak("Ready.", 1.0)  # a wrong voice name fails here, at load
        return runner

    def _speak(self, text: str, speed: float) -> tuple[bytes, int]:
        low, high = WPM_RANGE
        wpm = min(high, max(low, round(self.wpm * speed)))
        try:  # the text goes on stdin, so nothing in it is read as an option
            done = subprocess.run([self.program, "--stdout", "-v", self.voice, "-s", str(wpm),
                                   "-p", str(self.pitch)], input=text.encode("utf-8"),
                                  capture_output=True, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"espeak-ng took longer than {TIMEOUT_S:g} s for one sentence") from exc
        if done.returncode != 0 or not done.stdout:
            detail = done.stderr.decode("utf-8", "replace").strip() or f"exit status {done.returncode}"
            raise RuntimeError(f"espeak-ng failed (voice {self.voice!r}): {detail}")
        return wav_samples(done.stdout)

    def speak_steps(self, text: str, speed: float = 1.0) -> Iterator[Piece]:
        """One ``Piece`` per sentence (the appliance's own sentence cutter, as spoken chat uses)."""
        for sentence in split_sentences(text):
            if sentence.strip():
                pcm, rate = self._speak(sentence.strip(), speed)
                yield Piece(pcm, rate, sentence.strip())

    def warm_up(self) -> None:
        pass  # nothing resident to warm: each sentence starts the program afresh

    def close(self) -> None:
        pass
