"""Personas, aliases and scenes through both front doors: a real Mosquitto, the demo model, the
real ``openai`` client; the scene schedule driven by a simulated clock.

One appliance for the module. Its scenes start on leap days (29 February), so the real clock never
fires them while the tests drive the schedule with simulated times.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from mqtt_client import Client, write_config
from test_personas import COYOTE

from appliance.app import Appliance
from appliance.cli import main
from appliance.config import ConfigError, load_config

BASE = "scenes"
GUIDE = "You are the gallery's guide. Answer in one short sentence."
PERSONAS = [
    {"name": "coyote", "model": "demo", "system": COYOTE, "max_tokens": 12, "temperature": 0.0,
     "image": {"prefix": "desert at night,", "negative_prompt": "daylight", "steps": 2}},
    {"name": "guide", "system": GUIDE, "max_tokens": 6, "temperature": 0.0},
]
SCENES = [
    {"name": "opening", "start": "0 10 29 2 *", "personas": ["guide", "coyote"], "default_persona": "guide",
     "unload": ["tiny"]},
    {"name": "night", "start": "0 22 29 2 *", "personas": ["coyote"], "default_persona": "coyote",
     "load": ["tiny"]},
]
LEAP_DAY = datetime(2028, 2, 29).astimezone()


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, mqtt_broker, demo_bundle_fp32: Path,  # type: ignore[no-untyped-def]
                tiny_bundles: dict[str, tuple[Path, Path]]) -> Path:
    tmp = tmp_path_factory.mktemp("scenes")
    path = write_config(tmp, mqtt_broker.port, BASE, demo_bundle_fp32,
                        http={"enabled": True, "host": "127.0.0.1", "port": 0},
                        journal={"path": str(tmp / "journal.sqlite3")})
    data = yaml.safe_load(path.read_text())
    data["models"][0]["aliases"] = ["gpt-4o-mini"]
    data["models"].append({"id": "tiny", "kind": "chat", "path": str(tiny_bundles["llama"][1]),
                           "runtime": "onnx", "preload": False})
    data["personas"], data["scenes"] = PERSONAS, SCENES
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def app(config_path: Path) -> Iterator[Appliance]:
    appliance = Appliance(load_config(config_path, env={}))
    appliance.start()
    assert appliance.engine.wait_loaded(120) and appliance.link.subscribed.wait(10)
    yield appliance
    appliance.stop()


@pytest.fixture
def client(mqtt_broker) -> Iterator[Client]:  # type: ignore[no-untyped-def]
    c = Client(mqtt_broker.port)
    yield c
    c.close()


@pytest.fixture
def oai(app: Appliance) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{app.http.bound_port}/v1", api_key="x",  # type: ignore[union-attr]
                         max_retries=0)


def ask(client: Client, topic: str, body: dict[str, Any]) -> dict[str, Any]:
    client.subscribe(f"{BASE}/response/{topic}")
    seen = len(client.messages[f"{BASE}/response/{topic}"])
    client.publish(f"{BASE}/request/{topic}", body)
    client.wait(lambda: len(client.messages[f"{BASE}/response/{topic}"]) > seen)
    return client.json(f"{BASE}/response/{topic}")[seen]


def retained_scene(client: Client, scene: str) -> dict[str, Any]:
    client.subscribe(f"{BASE}/scene")
    client.wait(lambda: any(b["scene"] == scene for b in client.json(f"{BASE}/scene")))
    return [b for b in client.json(f"{BASE}/scene") if b["scene"] == scene][-1]


def wait_until(predicate: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert predicate()


def test_a_scheduled_start_on_a_simulated_clock_changes_the_personas_and_is_announced(
        app: Appliance, client: Client) -> None:
    scenes = app.scenes
    client.subscribe(f"{BASE}/event")
    scenes.clock = lambda: LEAP_DAY + timedelta(hours=12)
    assert scenes.tick(LEAP_DAY + timedelta(hours=12)) == "opening"
    assert [p.name for p in app.engine.personas()] == ["coyote", "guide"]
    assert scenes.tick(LEAP_DAY + timedelta(hours=21, minutes=59)) is None, "no start came since noon"
    scenes.clock = lambda: LEAP_DAY + timedelta(hours=22)
    assert scenes.tick(LEAP_DAY + timedelta(hours=22)) == "night"
    announced = retained_scene(client, "night")
    assert announced["personas"] == ["coyote"] and announced["default_persona"] == "coyote"
    assert announced["reason"] == "schedule" and announced["since"].startswith("2028-02-29T22:00")
    assert announced["next"]["scene"] == "opening" and announced["next"]["at"].startswith("2032-02-29T10:00")
    client.wait(lambda: any(e["event"] == "scene_changed" and e["scene"] == "night"
                            for e in client.json(f"{BASE}/event")))
    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{app.http.bound_port}/v1", api_key="x",  # type: ignore[union-attr]
                        max_retries=0)
    said = "persona 'guide' is not in the current scene; its personas: coyote"
    hi = [{"role": "user", "content": "Hi"}]
    for extra in ({"model": "guide"}, {"model": "coyote", "extra_body": {"persona": "guide"}}):
        with pytest.raises(openai.NotFoundError) as http:  # one message and code at every door
            oai.chat.completions.create(messages=hi, **extra)  # type: ignore[call-overload]
        assert http.value.code == "model_not_found" and said in str(http.value), http.value
    for field in ("persona", "model"):
        refused = ask(client, "chat", {"id": f"g-{field}", field: "guide", "prompt": "Hello?"})
        assert refused["status"] == "error" and refused["error"] == {"code": "model_not_found",
                                                                     "message": said}, refused
    plain = ask(client, "chat", {"id": "n1", "prompt": "Who are you?"})
    assert plain["status"] == "ok", plain
    assert plain["data"]["model"] == "coyote", "the answer names the persona, as over HTTP"
    named = ask(client, "chat", {"id": "n2", "model": "coyote", "prompt": "Hi.", "max_tokens": 2})
    assert named["data"]["model"] == "coyote"
    answer = oai.chat.completions.create(model="coyote", messages=hi, max_tokens=2)
    assert answer.model == named["data"]["model"]
    assert plain["data"]["usage"]["cached_tokens"] >= 256, "a request naming nothing is the night's coyote"
    assert plain["data"]["usage"]["completion_tokens"] <= 12, "with the coyote's max_tokens"
    wait_until(lambda: "tiny" in app.engine.loaded_models())  # the night scene loads its model
    assert scenes.tick(LEAP_DAY + timedelta(days=1)) is None, "the next start is in four years"


def test_the_scene_jobs_are_apscheduler_cron_jobs(app: Appliance) -> None:
    job = app.scheduler.get_job("scene-night")
    assert job is not None
    fire = job.trigger.get_next_fire_time(None, LEAP_DAY)
    assert fire is not None and (fire.month, fire.day, fire.hour, fire.minute) == (2, 29, 22, 0)


def test_a_request_switches_the_scene_and_unknown_ones_are_refused(app: Appliance, client: Client) -> None:
    client.subscribe(f"{BASE}/response/scene")
    client.publish(f"{BASE}/request/scene", "opening")  # what a Home Assistant select sends
    client.wait(lambda: any(b["status"] == "ok" for b in client.json(f"{BASE}/response/scene")))
    reply = next(b for b in client.json(f"{BASE}/response/scene") if b["status"] == "ok")
    assert reply["data"]["scene"] == "opening" and reply["data"]["reason"] == "request"
    assert retained_scene(client, "opening")["personas"] == ["coyote", "guide"]
    wait_until(lambda: "tiny" not in app.engine.loaded_models())  # the opening unloads it again
    bad = ask(client, "scene", {"id": "s2", "scene": "disco"})
    assert bad["status"] == "error" and bad["error"]["code"] == "bad_request"
    assert "opening" in bad["error"]["message"] and "night" in bad["error"]["message"]
    discovery = [json.loads(m.payload) for m in _retained(client, "homeassistant/device/scenes/config")]
    select = discovery[-1]["components"]["scene"]
    assert select["platform"] == "select" and select["options"] == ["opening", "night"]


def _retained(client: Client, topic: str) -> list[Any]:
    client.subscribe(topic)
    client.wait(lambda: bool(client.messages[topic]))
    return client.messages[topic]


def test_a_persona_over_mqtt_is_warm_and_bounded_and_a_wrong_one_is_named(
        app: Appliance, client: Client) -> None:
    app.scenes.switch("opening", "test")
    answer = ask(client, "chat", {"id": "c1", "persona": "coyote", "prompt": "What do you see tonight?"})
    assert answer["status"] == "ok", answer
    usage = answer["data"]["usage"]
    assert usage["cached_tokens"] >= 256 and usage["completion_tokens"] <= 12
    guide = ask(client, "chat", {"id": "c2", "persona": "guide", "prompt": "Where is the exit?",
                                 "max_tokens": 3})
    assert guide["status"] == "ok" and guide["data"]["usage"]["completion_tokens"] <= 3, \
        "the request's own max_tokens wins"
    as_model = ask(client, "chat", {"id": "c4", "model": "coyote", "prompt": "Hi", "max_tokens": 2})
    assert as_model["status"] == "ok" and as_model["data"]["usage"]["cached_tokens"] >= 256, "as over HTTP"
    wrong = ask(client, "chat", {"id": "c3", "persona": "raven", "prompt": "Hi"})
    assert wrong["status"] == "error" and "raven" in wrong["error"]["message"]


def test_personas_and_aliases_over_http_with_the_openai_client(app: Appliance, oai: openai.OpenAI) -> None:
    app.scenes.switch("opening", "test")
    listed = {m.id: m for m in oai.models.list().data}
    assert {"demo", "gpt-4o-mini", "coyote", "guide"} <= set(listed)
    assert listed["coyote"].model_extra["parent"] == "demo"  # type: ignore[index]
    assert listed["gpt-4o-mini"].model_extra["parent"] == "demo"  # type: ignore[index]
    coyote = oai.chat.completions.create(model="coyote", messages=[{"role": "user", "content": "Hello!"}])
    assert coyote.model == "coyote" and coyote.usage is not None
    assert coyote.usage.completion_tokens <= 12, "the persona's max_tokens when the client gives none"
    assert coyote.usage.prompt_tokens_details.cached_tokens >= 256  # type: ignore[union-attr]
    extra = oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hello!"}],
                                        extra_body={"persona": "coyote"}, max_tokens=3)
    assert extra.usage.prompt_tokens_details.cached_tokens >= 256  # type: ignore[union-attr]
    alias = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=3)
    assert alias.choices[0].message.content is not None
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                    extra_body={"persona": "raven"})
    assert missing.value.body["param"] == "persona"  # type: ignore[index]


def test_appliance_check_prints_personas_and_scenes_and_refuses_a_bad_schedule(
        config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "persona    coyote on demo: system prompt" in out and "256 tokens kept warm" in out
    assert "persona    guide on demo" in out and "SHORTER THAN ONE PREFILL CHUNK" in out
    assert "scene      night: starts '0 22 29 2 *'" in out and "loads tiny" in out
    assert "in scene night:" in out and "in scene opening:" in out
    data = yaml.safe_load(config_path.read_text())
    data["scenes"][1]["start"] = "0 25 * * *"
    data["scenes"][0]["personas"] = ["guide", "raven"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as raised:
        load_config(bad, env={})
    assert any(p.startswith("scenes[1].start") and "crontab" in p for p in raised.value.problems)
    data["scenes"][1]["start"] = "0 22 * * *"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no persona 'raven'"):
        load_config(bad, env={})


def test_the_coyote_example_of_operations_md_is_a_valid_config(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md").read_text()
    section = text[text.index("## Personas and scenes"):text.index("## Rehearsing on a bench")]
    blocks = [yaml.safe_load(b.split("```")[0]) for b in section.split("```yaml\n")[1:]]
    config = {**blocks[0], **blocks[1]}
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path, env={})
    assert [p.name for p in loaded.personas] == ["coyote", "guide"]
    coyote = loaded.engine_personas()[0]
    assert coyote.defaults == {"temperature": 0.8, "top_p": 0.95, "max_tokens": 80, "stop": ("Visitor:",)}
    assert [m.id for m in loaded.resident_models(loaded.scenes[1])] == ["smollm2-135m-instruct"]
    assert loaded.engine.senders["sensor-*"].per_minute == 6
    assert loaded.engine_settings().senders["console"].priority == 0


def test_a_scenes_models_are_prepared_ahead_of_its_start() -> None:
    from apscheduler.schedulers.background import BackgroundScheduler

    from appliance.persona_config import SceneConfig
    from appliance.scenes import Scenes
    from appliance.topics import Topics

    now = datetime(2028, 2, 29, 21, 0).astimezone()
    scene = SceneConfig(name="night", start="0 22 29 2 *", load=["tiny"], prepare=120)
    scenes = Scenes([scene], None, lambda *a, **k: None, Topics("t"), lambda *a, **k: None,  # type: ignore[arg-type]
                    clock=lambda: now)
    scheduler = BackgroundScheduler()
    scenes.register(scheduler)
    scheduler.start(paused=True)
    try:
        prepare = scheduler.get_job("scene-prepare-night")
        assert prepare is not None and prepare.next_run_time == now.replace(hour=21, minute=58)
        start = scheduler.get_job("scene-night")
        assert start is not None and start.next_run_time.year == 2028  # the real clock's next leap day
    finally:
        scheduler.shutdown(wait=False)
