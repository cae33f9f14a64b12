"""Home Assistant's Wyoming protocol: the appliance's speech-to-text and text-to-speech for Assist.

Two TCP servers from the ``wyoming`` package (ASR on ``voice.wyoming.asr_port``, TTS on
``tts_port``; 10300 and 10200 as Home Assistant's own add-ons use), on one asyncio loop in a
thread of their own. Each connection is a ``SpeechSession``: ``describe`` answers with the
installed models and voices; ``transcribe`` + ``audio-start``/``audio-chunk``/``audio-stop``
becomes one stt job answered with a ``transcript``; ``synthesize`` becomes one tts job whose
sentences go out as ``audio-chunk`` events between ``audio-start`` and ``audio-stop``. Jobs go
through the engine's client API like every front door; a refusal is a Wyoming ``error`` event.
With ``zeroconf: true`` both servers are announced as ``_wyoming._tcp`` so Home Assistant finds them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from npu.engine.api import (
    Done,
    EngineClient,
    EngineError,
    Failed,
    JobEvent,
    Request,
    SpeechAudio,
    SpeechRequest,
    TranscriptionRequest,
    TranscriptionResult,
)
from npu.speech.audio import pcm16_clip
from npu.speech.params import SpeechInputError, SpeechParams
from npu.speech.voices import resolve_voice

logger = logging.getLogger(__name__)
CHUNK_SAMPLES = 1024  # samples per audio-chunk sent: what Wyoming's own servers send


@dataclass(frozen=True)
class WyomingSettings:
    host: str = "0.0.0.0"
    asr_port: int = 10300
    tts_port: int = 10200
    zeroconf: bool = False
    name: str = "appliance"


def make_info(engine: EngineClient, version: str) -> Any:
    from wyoming.info import AsrModel, AsrProgram, Attribution, Info, TtsProgram, TtsVoice

    models = engine.models()
    by = Attribution(name="appliance", url="https://github.com/")
    asr = [AsrModel(name=m.id, attribution=by, installed=m.loaded, description=f"{m.id} ({m.backend})",
                    version=version, languages=["en"]) for m in models if m.kind == "stt"]
    voices = [TtsVoice(name=m.id, attribution=by, installed=m.loaded, description=f"{m.id} ({m.backend})",
                       version=version, languages=["en"]) for m in models if m.kind == "tts"]
    asr_programs = [AsrProgram(name="appliance-stt", attribution=by, installed=True, version=version,
                               description="speech to text", models=asr)] if asr else []
    tts_programs = [TtsProgram(name="appliance-tts", attribution=by, installed=True, version=version,
                               description="text to speech", voices=voices)] if voices else []
    return Info(asr=asr_programs, tts=tts_programs)


class WyomingServer:
    """Both servers on their own loop and thread; ``start`` binds (ports known), ``stop`` closes."""

    def __init__(self, engine: EngineClient, settings: WyomingSettings, version: str = "") -> None:
        self.engine = engine
        self.settings = settings
        self.version = version
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="wyoming", daemon=True)
        self._servers: list[Any] = []
        self._zeroconf: list[Any] = []
        self.ports: dict[str, int] = {}

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        from wyoming.server import AsyncTcpServer

        s = self.settings
        for name, port in (("asr", s.asr_port), ("tts", s.tts_port)):
            server = AsyncTcpServer(s.host, port)
            await server.start(self._session)
            self._servers.append(server)
            self.ports[name] = server._server.sockets[0].getsockname()[1]
        if s.zeroconf:
            from wyoming.zeroconf import HomeAssistantZeroconf

            for name, port in self.ports.items():
                announcer = HomeAssistantZeroconf(port=port, name=f"{s.name}-{name}")
                await announcer.register_server()
                self._zeroconf.append(announcer)
        logger.info("Wyoming: speech to text on port %d, text to speech on port %d", self.ports["asr"],
                    self.ports["tts"])

    def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Any:
        return make_session(reader, writer, self.engine, lambda: make_info(self.engine, self.version))

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            for server in self._servers:
                await server.stop()
            for announcer in self._zeroconf:
                await announcer._aiozc.async_close()

        try:
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        except Exception:
            logger.exception("stopping the Wyoming servers failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def make_session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, engine: EngineClient,
                 info: Callable[[], Any]) -> Any:
    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.error import Error
    from wyoming.event import Event
    from wyoming.info import Describe
    from wyoming.server import AsyncEventHandler
    from wyoming.tts import Synthesize

    class SpeechSession(AsyncEventHandler):  # type: ignore[misc]
        """One client connection (Home Assistant opens one per request)."""

        def __init__(self) -> None:
            super().__init__(reader, writer)
            self.language: str | None = None
            self.model: str | None = None
            self.audio: list[bytes] = []
            self.format = (16000, 2, 1)

        async def handle_event(self, event: Event) -> bool:
            if Describe.is_type(event.type):
                await self.write_event(info().event())
            elif Transcribe.is_type(event.type):
                transcribe = Transcribe.from_event(event)
                self.language, self.model, self.audio = transcribe.language, transcribe.name, []
            elif AudioStart.is_type(event.type):
                start = AudioStart.from_event(event)
                self.format, self.audio = (start.rate, start.width, start.channels), []
            elif AudioChunk.is_type(event.type):
                chunk = AudioChunk.from_event(event)
                self.format = (chunk.rate, chunk.width, chunk.channels)
                self.audio.append(chunk.audio)
            elif AudioStop.is_type(event.type):
                await self._transcribe()
            elif Synthesize.is_type(event.type):
                await self._synthesize(Synthesize.from_event(event))
            return True

        async def _error(self, message: str, code: str) -> None:
            await self.write_event(Error(text=message, code=code).event())

        async def _run(self, request: Request) -> None:
            """Submit a job (off the loop); its events arrive on ``self._queue``, Done or Failed last."""
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[JobEvent] = asyncio.Queue()
            self._queue = queue
            await loop.run_in_executor(
                None, engine.submit, request, lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))

        async def _transcribe(self) -> None:
            rate, width, channels = self.format
            if width != 2:
                await self._error(f"width must be 2 (16-bit samples), not {width}", "bad_request")
                return
            try:
                clip = pcm16_clip(b"".join(self.audio), rate, channels)
                await self._run(TranscriptionRequest(clip, language=self.language, model=self.model))
            except (SpeechInputError, EngineError) as exc:
                await self._error(str(exc), getattr(getattr(exc, "code", None), "value", "bad_request"))
                return
            while True:
                event = await self._queue.get()
                if isinstance(event, Done) and isinstance(event.result, TranscriptionResult):
                    result = event.result
                    await self.write_event(Transcript(text=result.text, language=result.language).event())
                    return
                if isinstance(event, Failed):
                    await self._error(event.error.message, event.error.code.value)
                    return

        async def _synthesize(self, synthesize: Any) -> None:
            wanted = synthesize.voice.name if synthesize.voice is not None else None
            try:
                voices = [m.id for m in engine.models() if m.kind == "tts"]
                model = resolve_voice(wanted, voices)
                await self._run(SpeechRequest(SpeechParams(text=synthesize.text), model=model))
            except (ValueError, EngineError) as exc:
                await self._error(str(exc), getattr(getattr(exc, "code", None), "value", "bad_request"))
                return
            started = False
            while True:
                event = await self._queue.get()
                if isinstance(event, SpeechAudio):
                    piece = event.piece
                    if not started:
                        started = True
                        await self.write_event(AudioStart(rate=piece.rate, width=2, channels=1).event())
                    step = CHUNK_SAMPLES * 2
                    for i in range(0, len(piece.pcm), step):
                        await self.write_event(AudioChunk(rate=piece.rate, width=2, channels=1,
                                                          audio=piece.pcm[i:i + step]).event())
                elif isinstance(event, Done):
                    await self.write_event(AudioStop().event())
                    return
                elif isinstance(event, Failed):
                    await self._error(event.error.message, event.error.code.value)
                    return

    return SpeechSession()
