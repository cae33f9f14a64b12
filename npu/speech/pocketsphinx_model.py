"""Speech to text with PocketSphinx, the light fallback: CMU's HMM recogniser, English, no GPU, no
hub; the ``pocketsphinx`` package (BSD-2-Clause) ships its en-US acoustic model, language model
and dictionary. Far less accurate than Whisper (it hears clear speech of common words; it mishears
names, numbers and synthetic voices such as espeak-ng's) but about 40 MB and quick on any core.

A folder is a PocketSphinx model when it holds an acoustic model folder (with ``mdef``), a
``*.lm.bin`` language model and a ``*.dict`` dictionary, as the package's own ``en-us`` folder
does; a Whisper folder falls back to the shipped en-US model when faster-whisper is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from npu.speech.audio import to_pcm16
from npu.speech.params import Segment

RATE = 16000
FRAME_RATE = 100  # PocketSphinx's frames per second: segment times are in these
WINDOW_S = 30  # one step decodes at most this much audio, as Whisper's windows


def model_files(folder: Path) -> dict[str, str] | None:
    """``hmm``, ``lm`` and ``dict`` of a PocketSphinx model folder, or None when it is not one."""
    hmm = next((p.parent for p in sorted(folder.glob("*/mdef"))), None)
    if (folder / "mdef").is_file():
        hmm = folder
    lm = next((p for p in sorted(folder.glob("*.lm.bin")) if "-phone" not in p.name), None)
    dictionary = next(iter(sorted(folder.glob("*.dict"))), None)
    if hmm is None or lm is None or dictionary is None:
        return None
    return {"hmm": str(hmm), "lm": str(lm), "dict": str(dictionary)}


def is_pocketsphinx_model(folder: Path) -> bool:
    return model_files(folder) is not None


def shipped_model() -> Path:
    """The en-US model inside the pocketsphinx package."""
    return Path(_pocketsphinx().get_model_path()) / "en-us"


def _pocketsphinx() -> Any:
    try:
        import pocketsphinx
    except ImportError as exc:
        raise RuntimeError("pocketsphinx is not installed (pip install 'appliance[speech-light]')") from exc
    return pocketsphinx


class PocketSphinxRunner:
    """A resident decoder; ``transcribe_steps`` yields one segment per 30-second window."""

    backend = "pocketsphinx"
    rate = RATE
    english_only = True

    def __init__(self, decoder: Any, name: str) -> None:
        self._decoder = decoder
        self.name = name

    @classmethod
    def load(cls, folder: Path | None = None) -> PocketSphinxRunner:
        """The model in ``folder``, or the package's en-US model when the folder holds none."""
        pocketsphinx = _pocketsphinx()
        files = model_files(folder) if folder is not None else None
        files = files or model_files(shipped_model())
        if files is None:
            raise FileNotFoundError("the pocketsphinx package holds no en-US model")
        decoder = pocketsphinx.Decoder(samprate=RATE, loglevel="FATAL", **files)
        return cls(decoder, folder.name if folder is not None else "pocketsphinx-en-us")

    def check_language(self, language: str | None) -> None:
        if language and language != "en":
            raise ValueError(f"the speech-to-text model {self.name} (PocketSphinx) understands English "
                             f"only, not {language!r}")

    def transcribe_steps(self, samples: np.ndarray, language: str | None = None) -> Iterator[Segment]:
        window = WINDOW_S * RATE
        for n, start in enumerate(range(0, max(len(samples), 1), window)):
            part = samples[start:start + window]
            decoder = self._decoder
            decoder.start_utt()
            decoder.process_raw(to_pcm16(part), full_utt=True)
            decoder.end_utt()
            hyp = decoder.hyp()
            words = [s for s in decoder.seg() if not s.word.startswith(("<", "["))]
            offset = start / RATE
            begin = offset + (words[0].start_frame / FRAME_RATE if words else 0.0)
            end = offset + (words[-1].end_frame / FRAME_RATE if words else len(part) / RATE)
            text = hyp.hypstr.strip() if hyp is not None else ""
            yield Segment(n, begin, end, text)

    def warm_up(self) -> None:
        for _ in self.transcribe_steps(np.zeros(RATE, np.float32)):
            pass

    def close(self) -> None:
        self._decoder = None
