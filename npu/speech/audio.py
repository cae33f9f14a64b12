"""Audio in and out: uploaded files decoded, raw PCM read, WAV written, sample rates converted.

Decoding and resampling use PyAV (FFmpeg's decoders and libswresample), which faster-whisper
installs too; it is imported when first needed, so the appliance runs without the voice extra.
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from typing import Any

import numpy as np

from npu.speech.params import AUDIO_FORMATS, MAX_AUDIO_SECONDS, Clip, SpeechInputError

WHISPER_RATE = 16000  # what Whisper, SenseVoice and Silero VAD take
# FFmpeg's demuxer names of the formats read here (OpenAI's list, less those FFmpeg reads as video).
AUDIO_FORMATS_BY_DEMUXER = {"wav": "wav", "flac": "flac", "mp3": "mp3", "ogg": "ogg"}
PCM_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)  # accepted for raw PCM input


def _av() -> Any:
    try:
        import av
    except ImportError as exc:  # the voice extra is not installed
        raise SpeechInputError("speech is not installed here (pip install 'appliance[voice]')") from exc
    return av


def decode_file(data: bytes, rate: int = WHISPER_RATE) -> Clip:
    """A WAV, FLAC, MP3 or Ogg file as mono audio at ``rate``; anything else is refused by name."""
    if not data:
        raise SpeechInputError("the audio file is empty")
    av = _av()
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.error.FFmpegError, ValueError) as exc:
        raise SpeechInputError(
            f"the file is not audio in a format read here ({', '.join(AUDIO_FORMATS)})") from exc
    with container:
        names = set(container.format.name.split(","))
        if not names & set(AUDIO_FORMATS_BY_DEMUXER):
            raise SpeechInputError(
                f"the file is {container.format.long_name or container.format.name}; send "
                f"{', '.join(AUDIO_FORMATS)}")
        if not container.streams.audio:
            raise SpeechInputError("the file holds no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
        parts: list[np.ndarray] = []
        total = 0
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    total += out.samples
                if total > MAX_AUDIO_SECONDS * rate:
                    raise SpeechInputError(f"the audio is longer than {MAX_AUDIO_SECONDS} s")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.error.FFmpegError as exc:
            raise SpeechInputError(f"the audio could not be decoded: {exc}") from exc
    pcm = np.concatenate(parts) if parts else np.zeros(0, np.int16)
    if not len(pcm):
        raise SpeechInputError("the file holds no audio samples")
    return Clip(pcm.astype(np.float32) / 32768.0, rate)



def pcm16_clip(pcm: bytes, rate: int, channels: int = 1) -> Clip:
    """Raw 16-bit little-endian PCM (interleaved when ``channels`` > 1) as a mono clip."""
    if rate not in PCM_RATES:
        raise SpeechInputError(f"sample rate {rate} Hz is not supported; use one of "
                               f"{', '.join(str(r) for r in PCM_RATES)}")
    if channels not in (1, 2):
        raise SpeechInputError(f"channels must be 1 or 2, not {channels}")
    usable = len(pcm) - len(pcm) % (2 * channels)
    samples = np.frombuffer(pcm[:usable], dtype="<i2").astype(np.float32) / 32768.0
    if channels == 2:
        samples = samples.reshape(-1, 2).mean(axis=1)
    return Clip(samples, rate)


def resample(clip: Clip, rate: int) -> Clip:
    """The clip at ``rate`` Hz, through libswresample (band-limited, unlike plain interpolation)."""
    if clip.rate == rate or not len(clip.samples):
        return Clip(clip.samples, rate) if not len(clip.samples) else clip
    av = _av()
    frame = av.AudioFrame.from_ndarray(clip.samples.reshape(1, -1).astype(np.float32), format="flt",
                                       layout="mono")
    frame.sample_rate = clip.rate
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    out = [f.to_ndarray().reshape(-1) for f in (*resampler.resample(frame), *resampler.resample(None))]
    return Clip(np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32), rate)


def to_pcm16(samples: np.ndarray) -> bytes:
    """Float samples in [-1, 1] as 16-bit little-endian PCM."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    """16-bit mono PCM wrapped in a WAV header."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return buffer.getvalue()


def pcm_chunks(pcm: bytes, size: int) -> Iterator[bytes]:
    """``pcm`` in pieces of at most ``size`` bytes, each a whole number of 16-bit samples."""
    size -= size % 2
    for start in range(0, len(pcm), size):
        yield pcm[start:start + size]
