"""OpenAI's audio API: ``POST /v1/audio/speech`` and ``POST /v1/audio/transcriptions``.

Speech: ``input`` becomes one tts job, answered as WAV at the voice's own rate, or as raw 16-bit
PCM at 24 kHz as OpenAI sends it (streamed sentence by sentence as the voice makes them). OpenAI's
voice names (``alloy``...) and model names (``tts-1``...) mean the default voice. Transcriptions:
a multipart upload (WAV, FLAC, MP3 or Ogg) is decoded off the event loop and becomes one stt job;
``whisper-1`` means the installed speech-to-text model. Uploads are capped at OpenAI's 25 MB
(a 413 before the body is read; ``BodyGuard`` knows this path).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from bridge_http.auth import require_api_key
from bridge_http.bridge import Bridge
from bridge_http.errors import OpenAIError
from bridge_http.jobs import IDLE, JobGroup
from bridge_http.streaming import collect
from npu.engine.api import (
    Done,
    EngineError,
    Failed,
    SpeechAudio,
    SpeechRequest,
    SpeechResult,
    TranscriptionRequest,
    TranscriptionResult,
)
from npu.speech.audio import decode_file, pcm16_clip, resample, to_pcm16, wav_bytes
from npu.speech.params import (
    LANGUAGE_PATTERN,
    MAX_AUDIO_BYTES,
    MAX_SPEECH_CHARS,
    SPEED_RANGE,
    Segment,
    SpeechInputError,
    SpeechParams,
)
from npu.speech.transcribers import resolve_stt_model
from npu.speech.voices import resolve_voice

router = APIRouter(dependencies=[Depends(require_api_key)])
TRANSCRIPTIONS = "/v1/audio/transcriptions"
UPLOAD_LIMITS = {TRANSCRIPTIONS: MAX_AUDIO_BYTES}  # multipart paths BodyGuard lets through, and their cap
OPENAI_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
TRANSCRIPTION_PARAMS = {"audio": "file"}  # the engine's field -> the form field it came from
OPENAI_PCM_RATE = 24000  # OpenAI's pcm: 24 kHz, 16-bit little-endian, mono
LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
                  "nl": "dutch", "ja": "japanese", "zh": "chinese", "ko": "korean", "pt": "portuguese"}


class SpeechBody(BaseModel):
    """OpenAI's speech request; fields it has that change nothing here (``instructions``) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1)
    input: str = Field(..., min_length=1, max_length=MAX_SPEECH_CHARS)
    voice: str = Field(..., min_length=1)
    response_format: Literal["wav", "pcm"] = "wav"
    speed: float = Field(1.0, ge=SPEED_RANGE[0], le=SPEED_RANGE[1])


def installed(bridge: Bridge, kind: str) -> list[str]:
    return [m.id for m in bridge.engine.models() if m.kind == kind]


def speech_model(bridge: Bridge, body: SpeechBody) -> str | None:
    voices = installed(bridge, "tts")
    try:
        chosen = resolve_voice(body.voice, voices)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param="voice", code="invalid_value") from exc
    if chosen is not None:
        return chosen
    if body.model in OPENAI_TTS_MODELS or body.model in voices:
        return body.model if body.model in voices else None
    raise OpenAIError(404, f"no speech model {body.model!r} here; installed: {', '.join(voices) or 'none'} "
                      f"({', '.join(OPENAI_TTS_MODELS)} mean the default voice)", param="model",
                      code="model_not_found")


@router.post("/v1/audio/speech")
async def handle_speech(body: SpeechBody, request: Request) -> Response:
    bridge: Bridge = request.app.state.bridge
    try:
        params = SpeechParams(text=body.input, speed=body.speed)
    except SpeechInputError as exc:
        raise OpenAIError(400, str(exc), param="input", code="invalid_value") from exc
    job = SpeechRequest(params, model=speech_model(bridge, body), request_id=f"tts-{secrets.token_hex(6)}",
                        sender=bridge.sender_of(request))
    group = JobGroup(bridge.engine)
    await group.submit([job])
    if body.response_format == "pcm":
        return StreamingResponse(stream_pcm(group), media_type="audio/pcm",
                                 headers={"X-Sample-Rate": str(OPENAI_PCM_RATE)})
    result = (await collect(group, request, 1))[0]
    assert isinstance(result, SpeechResult)
    return Response(wav_bytes(result.pcm, result.rate), media_type="audio/wav")


async def stream_pcm(group: JobGroup) -> AsyncIterator[bytes]:
    """Each sentence at 24 kHz as soon as it is made. The first sentence is awaited before the
    200 goes out only in the sense that a refusal already raised from ``submit``; a failure
    later ends the body early (a status cannot change once sent)."""
    try:
        async for item in group.events():
            if item is IDLE:
                continue
            _, event = item
            if isinstance(event, SpeechAudio):
                piece = event.piece
                clip = pcm16_clip(piece.pcm, piece.rate)
                yield to_pcm16(resample(clip, OPENAI_PCM_RATE).samples)
            elif isinstance(event, Failed | Done):
                return
    finally:
        group.cancel()


@router.post(TRANSCRIPTIONS)
async def handle_transcriptions(
    request: Request,
    file: UploadFile = File(...),  # noqa: B008  (FastAPI's way of declaring a form field)
    model: str = Form(..., min_length=1),
    language: str | None = Form(None, pattern=LANGUAGE_PATTERN),
    prompt: str | None = Form(None, max_length=MAX_SPEECH_CHARS),
    response_format: Literal["json", "text", "verbose_json", "srt", "vtt"] = Form("json"),
    temperature: float = Form(0.0, ge=0.0, le=1.0),
) -> Response:
    bridge: Bridge = request.app.state.bridge
    try:
        chosen = resolve_stt_model(model, installed(bridge, "stt"))
    except ValueError as exc:
        raise OpenAIError(404, str(exc), param="model", code="model_not_found") from exc
    data = await file.read()
    try:
        clip = await run_in_threadpool(decode_file, data)
    except SpeechInputError as exc:
        raise OpenAIError(400, f"file: {exc}", param="file", code="invalid_value") from exc
    job = TranscriptionRequest(clip, language=language, model=chosen,
                               request_id=f"stt-{secrets.token_hex(6)}", sender=bridge.sender_of(request))
    group = JobGroup(bridge.engine)
    try:
        await group.submit([job])
    except EngineError as err:  # the engine names its request's fields; the audio is OpenAI's ``file``
        named = TRANSCRIPTION_PARAMS.get(err.details.get("param", ""))
        raise OpenAIError.from_engine(err, param=named) from err
    result = (await collect(group, request, 1))[0]
    assert isinstance(result, TranscriptionResult)
    return transcription_response(result, response_format)


def transcription_response(result: TranscriptionResult, response_format: str) -> Response:
    if response_format == "text":
        return PlainTextResponse(result.text + "\n")
    if response_format == "srt":
        return PlainTextResponse(subtitles(result.segments, srt=True))
    if response_format == "vtt":
        return PlainTextResponse("WEBVTT\n\n" + subtitles(result.segments, srt=False), media_type="text/vtt")
    body: dict[str, Any] = {"text": result.text}
    if response_format == "verbose_json":
        body = {"task": "transcribe", "language": LANGUAGE_NAMES.get(result.language, result.language),
                "duration": round(result.audio_seconds, 3), "text": result.text,
                "segments": [segment_json(s) for s in result.segments]}
    return JSONResponse(body)


def segment_json(segment: Segment) -> dict[str, Any]:
    return {**dataclasses.asdict(segment), "seek": 0, "tokens": [], "temperature": 0.0,
            "compression_ratio": 1.0}


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def subtitles(segments: list[Segment], srt: bool) -> str:
    sep = "," if srt else "."
    blocks = []
    for n, s in enumerate(segments, 1):
        head = f"{n}\n" if srt else ""
        blocks.append(f"{head}{_stamp(s.start, sep)} --> {_stamp(s.end, sep)}\n{s.text}\n")
    return "\n".join(blocks)
