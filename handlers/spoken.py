"""A chat answer spoken as it is written: ``"speak": "<speaker>"`` on ``{base}/request/chat``.

The answer's deltas are cut into whole sentences (``npu.sentences.Chunker``, the same cutter as
``"chunk": "sentence"``), and each sentence becomes a tts job as soon as it is complete, so the
first sentence plays while the model still writes the next. Speech jobs share one lane per sender
in the audio class of the queue, so the sentences are spoken in order. Each sentence goes to the
speaker as its own utterance: PCM chunks between ``start`` and ``end`` (with ``index`` and
``sentence``) on ``{base}/audio/<speaker>/chunk`` and a WAV on ``{base}/audio/<speaker>``. The
chat's own reply and stream are unchanged.
"""

from __future__ import annotations

import itertools
import logging
import threading

from handlers.context import HandlerContext
from npu.engine.api import (
    Delta,
    Done,
    EngineError,
    Failed,
    JobEvent,
    Sink,
    SpeechAudio,
    SpeechRequest,
    SpeechResult,
)
from npu.sentences import Chunker
from npu.speech.audio import pcm_chunks, wav_bytes
from npu.speech.params import SpeechInputError, SpeechParams

logger = logging.getLogger(__name__)
PCM_CHUNK = 2048


class SentenceAudio:
    """Publishes one spoken sentence of an answer."""

    def __init__(self, ctx: HandlerContext, speaker: str, request_id: str | int, index: int) -> None:
        self.ctx, self.speaker, self.request_id, self.index = ctx, speaker, request_id, index
        self.started = False

    def __call__(self, event: JobEvent) -> None:
        try:
            self._handle(event)
        except Exception:
            logger.exception("speaking sentence %d of %r failed", self.index, self.request_id)

    def _handle(self, event: JobEvent) -> None:
        topic = self.ctx.topics.audio_chunk(self.speaker)
        head = {"id": self.request_id, "index": self.index}
        if isinstance(event, SpeechAudio):
            if not self.started:
                self.started = True
                self.ctx.publish(topic, {"event": "start", **head, "rate": event.piece.rate, "width": 2,
                                         "channels": 1}, qos=1)
            for chunk in pcm_chunks(event.piece.pcm, PCM_CHUNK):
                self.ctx.publish(topic, chunk, qos=1)
        elif isinstance(event, Done) and isinstance(event.result, SpeechResult):
            result = event.result
            end = {"event": "end", **head, "rate": result.rate, "bytes": len(result.pcm)}
            self.ctx.publish(topic, end, qos=1)
            self.ctx.publish(self.ctx.topics.audio(self.speaker), wav_bytes(result.pcm, result.rate), qos=1,
                             properties={"content_type": "audio/wav"})
        elif isinstance(event, Failed):
            if self.started:
                self.ctx.publish(topic, {"event": "end", **head, "error": event.error.code.value}, qos=1)
            logger.warning("sentence %d of %r was not spoken: %s", self.index, self.request_id,
                           event.error.message)


class SpokenAnswer:
    """Wraps a chat job's sink: every event goes on to it, and each finished sentence is spoken."""

    def __init__(self, inner: Sink, ctx: HandlerContext, speaker: str, request_id: str | int,
                 voice: str | None, sender: str | None) -> None:
        ctx.topics.audio(speaker)  # a bad speaker name is refused before the chat is queued
        self.inner, self.ctx, self.speaker, self.request_id = inner, ctx, speaker, request_id
        self.voice, self.sender = voice, sender
        self.chunker = Chunker("sentence")
        self._index = itertools.count()
        self._lock = threading.Lock()

    def __call__(self, event: JobEvent) -> None:
        with self._lock:
            try:
                if isinstance(event, Delta) and event.text:
                    self._speak(self.chunker.feed(event.text))
                elif isinstance(event, Done | Failed):
                    self._speak(self.chunker.flush())
            except Exception:
                logger.exception("speaking the answer of %r failed", self.request_id)
        self.inner(event)

    def _speak(self, sentences: list[str]) -> None:
        for sentence in sentences:
            if not sentence.strip():
                continue
            index = next(self._index)
            try:
                request = SpeechRequest(SpeechParams(sentence.strip()), model=self.voice,
                                        request_id=f"{self.request_id}-say{index}", sender=self.sender)
                self.ctx.engine.submit(request, SentenceAudio(self.ctx, self.speaker, self.request_id, index))
            except (EngineError, SpeechInputError) as exc:
                logger.warning("sentence %d of %r was not spoken: %s", index, self.request_id, exc)
