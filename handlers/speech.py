"""Speech over MQTT, sized for microcontrollers.

``{base}/request/speak`` ``{id, text, voice, format, speaker}``: the words become one tts job. The
whole utterance goes as a WAV to ``{base}/audio/<speaker>`` (not retained: a speaker that joins
later must not replay an old sentence); with ``"format": "pcm"`` the audio also goes, sentence by
sentence as the voice makes it, as 16-bit little-endian mono PCM in pieces of at most
``PCM_CHUNK`` bytes on ``{base}/audio/<speaker>/chunk``, between a ``start`` and an ``end`` JSON
message on the same topic that carry the sample rate, so a board with a small buffer plays while
the rest is made. The reply (``{base}/response/speak``, or the named sender's reply space) says
the rate, the duration and the topic. With ``moderation`` on, the text is screened as a prompt
first: a refused one is answered ``refused`` and no speaker hears it.

``{base}/listen/<node>/start|audio|stop``: a microphone streams one utterance. ``start`` (JSON:
``rate``, ``width``, ``channels``, ``language``, ``id``, ``vad``, ``reply_to``) opens it, binary PCM
on ``audio`` follows, ``stop`` (or Silero VAD hearing speech and then silence) ends it, and the
transcript is the reply on ``{base}/response/transcribe`` with ``data.text``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from handlers.chat import check_chat_id, reply_engine_error
from handlers.context import (
    PENDING,
    HandlerContext,
    HandlerError,
    RequestMeta,
    engine_request_id,
    queue_sender,
)
from handlers.moderation import gated
from handlers.payloads import PayloadError, RequestId, decode_payload, validate_payload
from handlers.reply import JobSink, Reply, route_reply
from npu.engine.api import (
    Done,
    EngineError,
    Failed,
    JobEvent,
    SpeechAudio,
    SpeechRequest,
    SpeechResult,
    TranscriptionRequest,
    TranscriptionResult,
)
from npu.speech.audio import PCM_RATES, WHISPER_RATE, pcm16_clip, pcm_chunks, resample, wav_bytes
from npu.speech.params import LANGUAGE_PATTERN, MAX_SPEECH_CHARS, SPEED_RANGE, SpeechInputError, SpeechParams
from npu.speech.transcribers import resolve_stt_model
from npu.speech.vad import UtteranceEnd
from npu.speech.voices import resolve_voice

logger = logging.getLogger(__name__)

PCM_CHUNK = 2048  # bytes per chunk message: a PubSubClient buffer of 2.5 KB takes it
MAX_LISTEN_SECONDS = 60.0  # one utterance; longer streams are transcribed at this point
LISTEN_IDLE_S = 30.0  # default of voice.listen_idle: a stream without audio this long is dropped
MAX_STREAMS = 16  # microphones streaming at once; each holds at most MAX_LISTEN_SECONDS of audio
_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class SpeakPayload(BaseModel):
    model_config = _STRICT

    id: RequestId | None = None
    reply_to: StrictStr | None = None
    text: StrictStr = Field(..., min_length=1, max_length=MAX_SPEECH_CHARS)
    voice: StrictStr | None = None
    format: Literal["wav", "pcm"] = "wav"
    speaker: StrictStr | None = None
    speed: float = Field(1.0, ge=SPEED_RANGE[0], le=SPEED_RANGE[1])


def voices_of(ctx: HandlerContext) -> list[str]:
    return [m.id for m in ctx.engine.models() if m.kind == "tts"]


class SpeakSink(JobSink):
    """Sends the PCM chunks as the sentences arrive, then the WAV and the reply."""

    def __init__(self, ctx: HandlerContext, reply: Reply, request_id: str | int, speaker: str,
                 fmt: str) -> None:
        super().__init__(reply, request_id)
        self.ctx = ctx
        self.speaker = speaker
        self.fmt = fmt
        self.started = False

    def _handle(self, event: JobEvent) -> None:
        topics = self.ctx.topics
        chunk_topic = topics.audio_chunk(self.speaker)
        if isinstance(event, SpeechAudio) and self.fmt == "pcm":
            piece = event.piece
            if not self.started:
                self.started = True
                self.ctx.publish(chunk_topic, {"event": "start", "id": self.request_id, "rate": piece.rate,
                                               "width": 2, "channels": 1}, qos=1)
            for chunk in pcm_chunks(piece.pcm, PCM_CHUNK):
                self.ctx.publish(chunk_topic, chunk, qos=1)
        elif isinstance(event, Done) and isinstance(event.result, SpeechResult):
            result = event.result
            if self.fmt == "pcm":
                self.ctx.publish(chunk_topic, {"event": "end", "id": self.request_id, "rate": result.rate,
                                               "bytes": len(result.pcm)}, qos=1)
            self.ctx.publish(topics.audio(self.speaker), wav_bytes(result.pcm, result.rate), qos=1,
                             properties={"content_type": "audio/wav"})
            self.reply.ok({"speaker": self.speaker, "topic": topics.audio(self.speaker), "format": self.fmt,
                           "rate": result.rate, "seconds": round(result.audio_seconds, 3),
                           "model": result.model, "ms": round(result.total_ms, 1)})
        elif isinstance(event, Failed):
            if self.started:
                self.ctx.publish(chunk_topic, {"event": "end", "id": self.request_id,
                                               "error": event.error.code.value}, qos=1)
            reply_engine_error(self.reply, event.error)


def handle_speak(req: SpeakPayload, ctx: HandlerContext, reply: Reply, meta: RequestMeta) -> Any:
    request_id = reply.request_id
    if request_id is None:
        raise HandlerError("bad_request", "a speak request needs an id")
    check_chat_id(request_id)
    speaker = req.speaker or "main"
    try:
        ctx.topics.audio(speaker)
        model = resolve_voice(req.voice, voices_of(ctx))
        params = SpeechParams(text=req.text, speed=req.speed)
    except (ValueError, SpeechInputError) as exc:
        raise HandlerError("bad_request", str(exc)) from exc
    request = SpeechRequest(params, model=model, request_id=engine_request_id(request_id, meta.sender),
                            sender=queue_sender(meta.sender))

    def submit() -> None:
        try:
            ctx.engine.submit(request, SpeakSink(ctx, reply, request_id, speaker, req.format))
        except EngineError as err:
            if not reply.sent:
                reply_engine_error(reply, err)

    # Words said aloud in public pass the same gate as a prompt: a refusal is spoken by no speaker.
    gated(ctx.moderation, ctx.engine, "speech", req.text, display=None, reply=reply, sender=meta.sender,
          submit=submit)
    return PENDING


class ListenStart(BaseModel):
    model_config = _STRICT

    id: RequestId | None = None
    reply_to: StrictStr | None = None
    rate: StrictInt = WHISPER_RATE
    width: StrictInt = 2
    channels: StrictInt = 1
    language: StrictStr | None = Field(None, pattern=LANGUAGE_PATTERN)
    vad: StrictBool = True
    model: StrictStr | None = None


@dataclass
class Utterance:
    start: ListenStart
    reply: Reply
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    last: float = field(default_factory=time.monotonic)
    vad: UtteranceEnd | None = None


class TranscribeSink(JobSink):
    def _handle(self, event: JobEvent) -> None:
        if isinstance(event, Done) and isinstance(event.result, TranscriptionResult):
            r = event.result
            self.reply.ok({"text": r.text, "language": r.language, "seconds": round(r.audio_seconds, 3),
                           "model": r.model, "ms": round(r.total_ms, 1)}, text=r.text)
        elif isinstance(event, Failed):
            reply_engine_error(self.reply, event.error)


class Listening:
    """The open microphone streams, one per node; fed by the dispatcher's thread, and swept for
    silent ones by the appliance's scheduler (``drop_idle`` every ``sweep_s``), since a node that
    went away sends nothing that would wake the dispatcher."""

    def __init__(self, ctx: HandlerContext, idle_s: float = LISTEN_IDLE_S) -> None:
        self.ctx = ctx
        self.idle_s = idle_s
        self.sweep_s = min(1.0, idle_s / 4)  # a silent stream is dropped at most this late
        self._open: dict[str, Utterance] = {}
        self._ended: set[str] = set()  # ended or refused: the node's trailing audio and stop are ignored
        self._lock = threading.Lock()

    def on_message(self, node: str, action: str, payload: bytes, response_topic: str | None = None,
                   correlation_data: bytes | None = None) -> None:
        self.drop_idle()
        if action == "start":
            self._start(node, payload, response_topic, correlation_data)
        elif action == "audio":
            self._audio(node, payload)
        elif action == "stop":
            with self._lock:
                utterance = self._open.pop(node, None)
                quiet = node in self._ended
            if utterance is None and not quiet:
                self._orphan(node, "stop", response_topic, correlation_data)
            elif utterance is None:
                pass
            else:
                self._transcribe(node, utterance)

    def _reply(self, reply_to: str | None, response_topic: str | None, correlation: bytes | None,
               request_id: str | int | None) -> Reply:
        route = route_reply(self.ctx.topics, "transcribe", response_topic, correlation, reply_to)
        return Reply(self.ctx.publish, route, request_id, text_copy=True)

    def _start(self, node: str, payload: bytes, response_topic: str | None,
               correlation: bytes | None) -> None:
        """Open the node's stream, or refuse it at once: everything ``start`` says is checked before
        any audio is sent (a refused node's audio and stop are then ignored until its next start)."""
        try:
            obj = decode_payload(payload) if payload.strip() else {}
            if isinstance(obj, str):
                raise PayloadError("bad_request", f"listen/{node}/start takes a JSON object (id, rate, "
                                   "width, channels, language, vad, reply_to, model) or an empty payload")
            start = validate_payload(ListenStart, obj, None)
            assert isinstance(start, ListenStart)
        except PayloadError as exc:
            self._refuse(node, self._reply(None, response_topic, correlation, exc.request_id), exc.code,
                         exc.message)
            return
        reply = self._reply(start.reply_to, response_topic, correlation, start.id if start.id is not None
                            else f"listen-{node}-{int(time.time() * 1000)}")
        if reply.route.refused is not None:
            self._refuse(node, reply, "bad_request", reply.route.refused)
            return
        problem = self._check_start(start)
        if problem:
            self._refuse(node, reply, *problem)
            return
        with self._lock:
            full = node not in self._open and len(self._open) >= MAX_STREAMS
        if full:
            self._refuse(node, reply, "busy", f"{MAX_STREAMS} microphones are streaming already; retry when "
                         "one has stopped", retry_after=5)
            return
        utterance = Utterance(start, reply, vad=UtteranceEnd() if start.vad else None)
        with self._lock:
            old = self._open.pop(node, None)
            self._open[node] = utterance
            self._ended.discard(node)
        if old is not None:
            old.reply.error("cancelled", f"a new listen/{node}/start replaced this stream")

    def _check_start(self, start: ListenStart) -> tuple[str, str] | None:
        """The code and message refusing this start, or None: the id, the audio's shape, the model
        and whether it knows the language."""
        if start.id is not None:
            try:
                check_chat_id(start.id)  # public job ids hold no '/': they cannot reach a named sender's
            except HandlerError as exc:
                return exc.code, exc.message
        if start.rate not in PCM_RATES:
            rates = ", ".join(map(str, PCM_RATES))
            return "bad_request", f"rate {start.rate} Hz is not supported; use one of {rates}"
        if start.width != 2:
            return "bad_request", f"width must be 2 (16-bit samples), not {start.width}"
        if start.channels not in (1, 2):
            return "bad_request", f"channels must be 1 or 2, not {start.channels}"
        models = [m for m in self.ctx.engine.models() if m.kind == "stt"]
        try:
            chosen = resolve_stt_model(start.model, [m.id for m in models])
        except ValueError as exc:
            return "model_not_found", str(exc)
        if not models:
            return "model_not_found", ("no speech-to-text model is installed here; 'appliance models demo' "
                                       "installs Whisper tiny.en")
        # The named model, or (none named) any of them: the engine's default is one of these.
        candidates = [m for m in models if chosen is None or m.id == chosen]
        language = start.language
        if language and candidates and all(m.languages is not None and language not in m.languages
                                           for m in candidates):
            model = candidates[0]
            known = model.languages or []
            if known == ["en"]:
                return "bad_request", (f"the speech-to-text model {model.id} understands English only, "
                                       f"not {language!r}")
            return "bad_request", (f"the speech-to-text model {model.id} does not know language "
                                   f"{language!r}; it knows {', '.join(known)}")
        return None

    def _refuse(self, node: str, reply: Reply, code: str, message: str, **extra: Any) -> None:
        """Answer a start that opens nothing; the node's stream (if one was open) is replaced by it,
        and its audio and stop are ignored until its next start."""
        with self._lock:
            old = self._open.pop(node, None)
            self._ended.add(node)
        if old is not None:
            old.reply.error("cancelled", f"a new listen/{node}/start replaced this stream")
        reply.error(code, message, **extra)

    def _audio(self, node: str, payload: bytes) -> None:
        with self._lock:
            utterance = self._open.get(node)
            quiet = node in self._ended
        if utterance is None:
            if not quiet:
                self._orphan(node, "audio", None, None)
            return
        start = utterance.start
        if len(payload) % (2 * start.channels):
            utterance.reply.error("bad_request", f"listen/{node}/audio must be whole 16-bit frames; "
                                  f"got {len(payload)} bytes")
            self._close(node, utterance)
            return
        utterance.parts.append(payload)
        utterance.size += len(payload)
        utterance.last = time.monotonic()
        seconds = utterance.size / (2 * start.channels * start.rate)
        ended = seconds >= MAX_LISTEN_SECONDS
        if utterance.vad is not None and not ended:
            clip = resample(pcm16_clip(payload, start.rate, start.channels), WHISPER_RATE)
            ended = utterance.vad.feed(clip.samples)
        if ended and self._close(node, utterance):
            with self._lock:
                self._ended.add(node)
            self._transcribe(node, utterance)

    def _close(self, node: str, utterance: Utterance) -> bool:
        with self._lock:
            if self._open.get(node) is utterance:
                del self._open[node]
                return True
        return False

    def _transcribe(self, node: str, utterance: Utterance) -> None:
        reply, start = utterance.reply, utterance.start
        request_id = reply.request_id if reply.request_id is not None else f"listen-{node}"
        try:
            clip = pcm16_clip(b"".join(utterance.parts), start.rate, start.channels)
            request = TranscriptionRequest(clip, language=start.language, model=start.model,
                                           request_id=engine_request_id(request_id, None),
                                           sender=queue_sender(None))
            self.ctx.engine.submit(request, TranscribeSink(reply, request_id))
        except EngineError as err:
            reply_engine_error(reply, err)
        except SpeechInputError as exc:
            reply.error("bad_request", str(exc))

    def _orphan(self, node: str, action: str, response_topic: str | None,
                correlation: bytes | None) -> None:
        self._reply(None, response_topic, correlation, None).error(
            "bad_request",
            f"listen/{node}/{action} without an open stream; publish listen/{node}/start first")

    def drop_idle(self) -> None:
        """Answer ``timeout`` to every stream without audio for ``idle_s``, freeing its slot."""
        now = time.monotonic()
        with self._lock:
            idle = [(n, u) for n, u in self._open.items() if now - u.last > self.idle_s]
            for node, _ in idle:
                del self._open[node]
                self._ended.add(node)
        for node, utterance in idle:
            utterance.reply.error("timeout",
                                  f"listen/{node}: no audio for {self.idle_s:g} s; stream dropped")

