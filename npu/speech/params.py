"""What a speech request may ask for, and the limits both front doors and Wyoming hold it to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_SPEECH_CHARS = 4096  # OpenAI's limit for /v1/audio/speech input
MAX_AUDIO_SECONDS = 600  # the longest audio transcribed in one request
MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's upload limit for /v1/audio/transcriptions
SPEED_RANGE = (0.25, 4.0)  # OpenAI's range for speed
AUDIO_FORMATS = ("wav", "flac", "mp3", "ogg")
LANGUAGE_PATTERN = r"^[a-z]{2,3}$"  # ISO-639-1 (or -3), as OpenAI's ``language`` is


class SpeechInputError(ValueError):
    """Audio or text that cannot be spoken or transcribed; the message names the problem."""


@dataclass(frozen=True)
class SpeechParams:
    """Text to speech: the words, the voice (None: the model's default), and the speed."""

    text: str
    voice: str | None = None
    speed: float = 1.0

    def __post_init__(self) -> None:
        check_text(self.text)
        low, high = SPEED_RANGE
        if not low <= self.speed <= high:
            raise SpeechInputError(f"speed must be between {low:g} and {high:g}, not {self.speed:g}")


def check_text(text: str) -> None:
    if not text.strip():
        raise SpeechInputError("the text to speak is empty")
    if len(text) > MAX_SPEECH_CHARS:
        raise SpeechInputError(f"the text to speak is {len(text)} characters; at most {MAX_SPEECH_CHARS}")


@dataclass(frozen=True)
class Segment:
    """A stretch of transcribed speech, times in seconds from the start of the audio."""

    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Piece:
    """One sentence of synthesised speech: 16-bit mono PCM at ``rate``."""

    pcm: bytes
    rate: int
    text: str = ""


@dataclass(frozen=True)
class Clip:
    """Mono audio as float32 samples in [-1, 1] at ``rate`` Hz."""

    samples: np.ndarray
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate if self.rate else 0.0
