"""The console (``/``) and a display page (``/display/<name>``) in a real headless Chromium.

Debian's ``chromium`` driven by Playwright through ``executable_path`` (Playwright never downloads
a browser here), against the whole appliance: a real Mosquitto, the demo chat model, a tiny Stable
Diffusion bundle and the simulated card, with an API key set. The run writes the screenshots in
docs/ (docs/console.png, docs/console-phone.png, docs/display.png).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from mqtt_broker import MosquittoBroker, free_port
from mqtt_client import Client, write_config

from appliance.app import Appliance
from appliance.config import load_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
KEY = "gallery-key-7"
BASE = "t_browser"
DOCS = Path(__file__).resolve().parent.parent / "docs"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Collects what the page's Content-Security-Policy refused, before any of the page's own scripts run.
CSP_WATCH = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("no browser tests: the playwright package is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no browser tests: no Chromium at {CHROMIUM} (./scripts/test installs Debian's "
                    "chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_playwright = _playwright()
    with sync_playwright() as p:
        # launch() gives every run a fresh, temporary user-data-dir of its own.
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


@dataclass
class Rig:
    broker: MosquittoBroker
    config: Path
    port: int
    app: Appliance
    mqtt: Client
    made: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_app(self) -> None:
        self.app = Appliance(load_config(self.config, env={}))
        self.app.start()
        assert self.app.engine.wait_loaded(120)
        assert self.app.link.subscribed.wait(10)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, demo_bundle_fp32: Path, sd_bundle: Path) -> Iterator[Rig]:
    _playwright()  # skip before starting anything when there is no browser
    tmp = tmp_path_factory.mktemp("browser")
    broker = MosquittoBroker(tmp / "mosquitto", persistent=True).start()
    port = free_port()
    models = [{"id": "demo", "kind": "chat", "path": str(demo_bundle_fp32), "runtime": "onnx"},
              {"id": "sd", "kind": "image", "path": str(sd_bundle), "runtime": "onnx"}]
    (tmp / "blocked.txt").write_text("brimstone\n")
    config = write_config(tmp, broker.port, BASE, demo_bundle_fp32, models=models,
                          moderation={"enabled": True, "blocklist": str(tmp / "blocked.txt")},
                          personas=[{"name": "coyote", "model": "demo", "system": "You are a coyote."}],
                          http={"enabled": True, "host": "127.0.0.1", "port": port, "api_key": KEY},
                          device={"backend": "sim", "health_interval": 0.25},
                          images={"display": "lobby", "format": "png"})
    app = Appliance(load_config(config, env={}))
    rig = Rig(broker, config, port, app, Client(broker.port))
    rig.start_app()
    try:
        yield rig
    finally:
        rig.mqtt.close()
        rig.app.stop()
        broker.stop()


@dataclass
class Watched:
    """A page and everything it reported: console errors and warnings, uncaught errors, requests."""

    page: Any
    problems: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)

    def csp(self) -> list[str]:
        return list(self.page.evaluate("window.__csp"))


def open_page(browser: Any, url: str, **context: Any) -> Watched:
    ctx = browser.new_context(**context)
    ctx.add_init_script(CSP_WATCH)
    page = ctx.new_page()
    watched = Watched(page)
    page.on("console", lambda m: m.type in ("error", "warning")
            and watched.problems.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: watched.problems.append(f"uncaught: {e}"))
    page.on("request", lambda r: (watched.urls.append(r.url), watched.headers.__setitem__(r.url, r.headers)))
    page.goto(url)
    return watched


def sign_in(page: Any, key: str = KEY) -> None:
    page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    page.fill("#login-key", key)
    page.click("#login button[type=submit]")


@pytest.fixture(scope="module")
def console(browser: Any, rig: Rig) -> Iterator[Watched]:
    watched = open_page(browser, rig.url + "/", viewport={"width": 1280, "height": 900})
    sign_in(watched.page)
    watched.page.wait_for_selector("#link[data-status=live]", timeout=10_000)
    yield watched
    watched.page.context.close()


def state_of(page: Any) -> str:
    return str(page.inner_text("#state"))


def wait_state(page: Any, state: str, timeout: float = 10.0) -> float:
    """Seconds until the page showed ``state``."""
    started = time.monotonic()
    page.wait_for_function("(s) => document.getElementById('state').dataset.state === s", arg=state,
                           timeout=timeout * 1000, polling="raf")
    return time.monotonic() - started


def test_pages_are_html_with_a_strict_content_security_policy(rig: Rig) -> None:
    for path in ("/", "/display/lobby"):
        r = httpx.get(rig.url + path, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "style-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp and "frame-ancestors 'none'" in csp
        assert "<script>" not in r.text and "style=" not in r.text, "no inline script or style to allow"
    for path in ("/", "/display/lobby", "/ui/console.js"):  # HEAD too (uptime checks, curl -I)
        head = httpx.head(rig.url + path, timeout=10)
        assert head.status_code == 200 and head.content == b"", (path, head.status_code)
    assert httpx.get(rig.url + "/display/a+b", timeout=10).status_code == 404
    assert httpx.get(rig.url + "/ui/../app.py", timeout=10).status_code == 404
    # The data and the actions need the key; the pages only ask for it.
    assert httpx.get(rig.url + "/console/events", timeout=10).status_code == 401
    assert httpx.post(rig.url + "/console/pause", json={}, timeout=10).status_code == 401
    assert httpx.get(rig.url + "/display/lobby/events", timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    refused = httpx.post(rig.url + "/console/restart", json={}, headers=auth, timeout=10)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "confirm"
    assert httpx.get(rig.url + "/console/auth", timeout=10).json() == {"required": True, "accepted": False}


def test_the_console_asks_for_the_key_and_loads_without_errors(browser: Any, rig: Rig) -> None:
    watched = open_page(browser, rig.url + "/", viewport={"width": 1280, "height": 900})
    page = watched.page
    try:
        sign_in(page, "not-the-key")
        page.wait_for_function("() => document.getElementById('login-note').textContent.includes('refused')")
        assert page.is_hidden("#main")
        sign_in(page)
        page.wait_for_selector("#link[data-status=live]", timeout=10_000)
        assert state_of(page) == "idle"
        temperature = "[data-device='0'] [data-field=temperature_c]"
        page.wait_for_function("(q) => document.querySelector(q).textContent.startsWith('50.0')",
                               arg=temperature)
        assert page.inner_text("[data-device='0'] [data-field=thermal]") == "normal"
        page.wait_for_selector("#log li[data-event=model_loaded]", state="attached")
        options = page.eval_on_selector_all("#chat-model option", "os => os.map(o => o.value)")
        assert options == ["demo", "coyote"], "the models and personas /v1/models lists, no image model"
        assert page.eval_on_selector_all("#image-model option", "os => os.map(o => o.value)") == ["sd"]
        time.sleep(0.5)
        assert watched.problems == [], watched.problems
        assert watched.csp() == [], "nothing the page does needs more than its policy allows"
        assert not any(KEY in url for url in watched.urls), "the key never goes into a URL"
        events = next(h for u, h in watched.headers.items() if u.endswith("/console/events"))
        assert events["authorization"] == f"Bearer {KEY}"
        assert page.evaluate("sessionStorage.getItem('appliance.api_key')") == KEY
        assert page.evaluate("localStorage.getItem('appliance.api_key')") is None, "kept for the tab only"
        # The policy is in force: an inline script is refused and reported.
        ran = page.evaluate("""() => { const s = document.createElement('script');
            s.textContent = 'window.__inline = true'; document.body.appendChild(s);
            return window.__inline === true; }""")
        assert ran is False
        page.wait_for_function("() => window.__csp.some((v) => v.startsWith('script-src'))")
    finally:
        page.context.close()


def test_state_changes_and_thermal_events_show_at_once(console: Watched, rig: Rig) -> None:
    page = console.page
    wait_state(page, "idle")
    pause, resume = f"{BASE}/request/pause", f"{BASE}/request/resume"
    for topic, state in ((pause, "paused"), (resume, "idle")):
        started = time.monotonic()
        rig.mqtt.publish(topic, {"id": state})  # returns once the broker has it
        wait_state(page, state, timeout=5)
        took = time.monotonic() - started
        assert took < 1.0, f"{state} showed {took:.2f} s after the request"
    rig.mqtt.publish(f"{BASE}/request/sim", {"temperature_c": 86})
    page.wait_for_selector("#log li[data-event=thermal_pause]", state="attached", timeout=10_000)
    page.wait_for_selector("[data-device='0'][data-thermal=pause]", timeout=10_000)
    wait_state(page, "paused")
    assert "too hot" in page.inner_text("#state-reason")
    rig.mqtt.publish(f"{BASE}/request/sim", {"temperature_c": 50})
    page.wait_for_selector("#log li[data-event=thermal_normal]", state="attached", timeout=10_000)
    wait_state(page, "idle")
    rig.mqtt.publish(f"{BASE}/request/chat", {"id": "gate", "prompt": "Sing of brimstone."})
    refusal = page.wait_for_selector("#log li[data-event=prompt_refused]", state="attached", timeout=10_000)
    assert "gate" in refusal.inner_text() and "brimstone" not in refusal.inner_text(), "no prompt text"
    assert console.problems == [], console.problems


def test_the_prompt_box_streams_the_answer(console: Watched, rig: Rig) -> None:
    page = console.page
    body = {"model": "demo", "messages": [{"role": "user", "content": "Write a line about <b>rain</b>."}],
            "temperature": 0, "max_tokens": 40, "seed": 3}
    answer = httpx.post(rig.url + "/v1/chat/completions", json=body, timeout=120,
                        headers={"Authorization": f"Bearer {KEY}"}).json()
    expected = answer["choices"][0]["message"]["content"]
    page.fill("#chat-prompt", "Write a line about <b>rain</b>.")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max", "40")
    page.fill("#chat-seed", "3")
    page.evaluate("""() => { window.__lengths = []; const answer = document.getElementById('chat-answer');
        new MutationObserver(() => window.__lengths.push(answer.textContent.length))
          .observe(answer, {childList: true, characterData: true, subtree: true}); }""")
    page.click("#chat-send")
    page.wait_for_selector("#chat-answer[data-done=true]", timeout=120_000)
    lengths = page.evaluate("window.__lengths")
    assert page.inner_text("#chat-answer").strip() == expected.strip()
    assert len({n for n in lengths if n}) >= 3, f"the answer arrived piece by piece, not at once: {lengths}"
    assert "finished" in page.inner_text("#chat-note")
    assert page.eval_on_selector_all("#chat-answer b", "bs => bs.length") == 0
    assert console.problems == [], console.problems


def test_the_queue_lists_each_job_with_its_kind_sender_and_place(console: Watched, rig: Rig) -> None:
    page = console.page
    wait_state(page, "idle")
    rig.mqtt.publish(f"{BASE}/request/pause", {"id": "hold"})
    wait_state(page, "paused")
    for i, sender in enumerate(("alice", "bob", "carol")):
        rig.mqtt.publish(f"{BASE}/request/chat/{sender}", {"id": f"q{i}", "prompt": "Count to three.",
                                                           "max_tokens": 8, "temperature": 0})
    page.wait_for_function("() => document.querySelectorAll('#queue-rows tr').length === 3", timeout=10_000)
    cells = "rs => rs.map(r => [...r.cells].map(c => c.textContent))"
    rows = page.eval_on_selector_all("#queue-rows tr", cells)
    assert [r[:4] for r in rows] == [["1", "chat", "alice", "queued"], ["2", "chat", "bob", "queued"],
                                     ["3", "chat", "carol", "queued"]], rows
    assert page.is_hidden("#queue-empty")
    # The header and the queue chart's figure count the same jobs as the table.
    counts = [page.inner_text(q) for q in ("#queue-depth", "#running", "#now-queue")]
    assert counts == ["3", "0", "3"], counts
    rig.mqtt.publish(f"{BASE}/request/resume", {"id": "go"})
    page.wait_for_function("() => document.querySelectorAll('#queue-rows tr').length === 0", timeout=60_000)
    wait_state(page, "idle", timeout=30)
    assert page.is_visible("#queue-empty")
    assert console.problems == [], console.problems


def test_restart_needs_a_confirmation_then_the_card_comes_back(console: Watched, rig: Rig) -> None:
    page = console.page
    wait_state(page, "idle")
    page.click("#pause")
    wait_state(page, "paused")
    page.wait_for_function("() => document.getElementById('action-note').textContent.startsWith('Paused')")
    page.click("#resume")
    wait_state(page, "idle")
    page.wait_for_function("() => document.getElementById('action-note').textContent.startsWith('Resumed')")
    page.wait_for_selector("#log li[data-event=paused]", state="attached", timeout=5_000)
    page.wait_for_selector("#log li[data-event=resumed]", state="attached", timeout=5_000)
    page.evaluate("""() => { window.__states = []; const badge = document.getElementById('state');
        new MutationObserver(() => window.__states.push(badge.dataset.state))
          .observe(badge, {attributes: true, attributeFilter: ['data-state']}); }""")
    page.click("#reload")
    page.wait_for_function("() => window.__states.includes('recovering')", timeout=30_000)
    wait_state(page, "idle", timeout=60)
    page.wait_for_function("() => document.getElementById('action-note').textContent"
                           ".startsWith('Models reloaded')", timeout=30_000)
    page.wait_for_selector("#log li[data-event=reloaded]", state="attached", timeout=5_000)
    page.click("#restart")
    assert page.is_visible("#restart-confirm")
    time.sleep(0.5)
    assert state_of(page) == "idle" and not page.query_selector("#log li[data-event=recovery_started]")
    page.click("#restart-yes")
    page.wait_for_selector("#log li[data-event=recovery_started]", state="attached", timeout=10_000)
    page.wait_for_selector("#log li[data-event=recovered]", state="attached", timeout=120_000)
    wait_state(page, "idle", timeout=60)
    page.wait_for_function("() => document.querySelector('[data-device=\"0\"] [data-field=status]')"
                           ".textContent === 'ok'", timeout=2_000)
    page.wait_for_function(
        "() => document.querySelector('[data-device=\"0\"] [data-field=recoveries]').textContent === '1'")
    page.wait_for_function("() => document.getElementById('chart-temp').dataset.points > 0", timeout=15_000)
    page.screenshot(path=str(DOCS / "console.png"), full_page=True)
    assert console.problems == [], console.problems


def test_personas_keep_their_settings_the_list_holds_chat_only_the_broker_link_shows_and_sign_out(
        browser: Any, rig: Rig) -> None:
    watched = open_page(browser, rig.url + "/", viewport={"width": 1280, "height": 900})
    page = watched.page
    sent: list[dict[str, Any]] = []
    try:
        # /v1/models as an appliance with a voice and a speech-to-text model lists it (the engine
        # knows their kinds: neither is a chat model, so neither belongs in the prompt's list).
        def models(route: Any) -> None:
            listed = route.fetch().json()
            listed["data"] += [{"id": "joe-us-medium", "object": "model", "owned_by": "appliance"},
                               {"id": "whisper-tiny-en", "object": "model", "owned_by": "appliance"}]
            route.fulfill(json=listed)

        page.route("**/v1/models", models)
        page.route("**/v1/chat/completions",
                   lambda route: (sent.append(json.loads(route.request.post_data)), route.continue_()))
        sign_in(page)
        page.wait_for_selector("#link[data-status=live]", timeout=10_000)
        page.wait_for_function("() => document.querySelectorAll('#chat-model option').length > 0")
        options = page.eval_on_selector_all("#chat-model option", "os => os.map(o => o.value)")
        assert options == ["demo", "coyote"], options
        assert page.get_attribute("#chat-temperature", "placeholder") == "default"
        assert page.get_attribute("#chat-max", "placeholder") == "default"
        # A persona with the fields left empty sends neither: the persona's own settings apply.
        page.select_option("#chat-model", "coyote")
        page.fill("#chat-prompt", "Howl.")
        page.click("#chat-send")
        page.wait_for_function("() => !document.getElementById('chat-stop').disabled", timeout=10_000)
        page.click("#chat-stop")
        page.wait_for_selector("#chat-answer[data-done=true]", timeout=30_000)
        assert sent[-1]["model"] == "coyote" and sent[-1]["stream"] is True
        assert "temperature" not in sent[-1] and "max_tokens" not in sent[-1], sent[-1]
        # The broker goes away: the header says so and the log has it; then it is back.
        page.wait_for_selector("#mqtt[data-status=up]", timeout=10_000)
        rig.broker.stop()
        try:
            started = time.monotonic()
            page.wait_for_selector("#mqtt[data-status=down]", timeout=5_000)
            page.wait_for_selector("#log li[data-event=mqtt_disconnected]", state="attached", timeout=5_000)
            assert time.monotonic() - started < 5
            assert "down" in page.inner_text("#mqtt")
        finally:
            rig.broker.start()
        page.wait_for_selector("#mqtt[data-status=up]", timeout=40_000)
        page.wait_for_selector("#log li[data-event=mqtt_connected]", state="attached", timeout=5_000)
        assert rig.app.link.subscribed.wait(10)
        # Sign out: the key is forgotten (the tab's and a remembered one) and the login form is back.
        page.evaluate("localStorage.setItem('appliance.api_key', 'remembered')")
        page.click("#signout")
        page.wait_for_selector("#login:not([hidden])", timeout=5_000)
        assert page.is_hidden("#main")
        assert page.evaluate("sessionStorage.getItem('appliance.api_key')") is None
        assert page.evaluate("localStorage.getItem('appliance.api_key')") is None
        page.reload()
        page.wait_for_selector("#login:not([hidden])", timeout=10_000)
        assert watched.problems == [], watched.problems
    finally:
        page.context.close()


def test_the_console_fits_a_phone(browser: Any, rig: Rig) -> None:
    watched = open_page(browser, rig.url + "/", viewport={"width": 390, "height": 844}, is_mobile=True,
                        has_touch=True, device_scale_factor=2)
    page = watched.page
    try:
        sign_in(page)
        page.wait_for_selector("#link[data-status=live]", timeout=10_000)
        page.wait_for_selector("[data-device='0']")
        wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert wide <= 0, f"the page is {wide} px wider than the phone"
        for button in ("#pause", "#restart", "#chat-send", "#image-send"):
            box = page.locator(button).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
        page.screenshot(path=str(DOCS / "console-phone.png"))
        assert watched.problems == [], watched.problems
    finally:
        page.context.close()


def shown(page: Any) -> str:
    return str(page.evaluate("document.body.dataset.shown || ''"))


def wait_shown(page: Any, sha: str, timeout: float = 60.0) -> None:
    page.wait_for_function("(sha) => document.body.dataset.shown === sha", arg=sha, timeout=timeout * 1000)


def dusk_picture() -> bytes:
    """A JPEG as an installation might publish it itself: a dusk sky, a sun, a skyline."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (800, 600))
    draw = ImageDraw.Draw(image)
    for y in range(600):
        t = y / 599
        draw.line([(0, y), (800, y)], fill=(int(40 + 200 * t), int(30 + 90 * t), int(90 - 40 * t)))
    draw.ellipse((330, 300, 470, 440), fill=(255, 190, 90))
    for x, height in ((0, 140), (90, 220), (170, 170), (260, 250), (480, 200), (560, 280), (680, 160)):
        draw.rectangle((x, 600 - height, x + 100, 600), fill=(25, 20, 35))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def mqtt_picture(rig: Rig, request_id: str, prompt: str, seed: int) -> str:
    """Ask for a picture over MQTT; the sha256 of the picture the lobby display got."""
    topic = f"{BASE}/response/image"
    rig.mqtt.subscribe(topic)
    before = len(rig.mqtt.messages[topic])
    rig.mqtt.publish(f"{BASE}/request/image", {"id": request_id, "prompt": prompt, "seed": seed})
    rig.mqtt.wait(lambda: len(rig.mqtt.messages[topic]) > before, timeout=120)
    reply = rig.mqtt.json(topic)[-1]
    assert reply["status"] == "ok", reply
    return str(reply["data"]["sha256"])


def test_the_display_page_swaps_pictures_and_comes_back_after_restarts(
    browser: Any, console: Watched, rig: Rig,
) -> None:
    display = open_page(browser, rig.url + "/display/lobby?caption=prompt&fade=300",
                        viewport={"width": 800, "height": 600})
    kiosk = display.page
    try:
        sign_in(kiosk)
        kiosk.wait_for_function("() => document.body.dataset.link === 'live'", timeout=10_000)
        assert kiosk.evaluate("localStorage.getItem('appliance.api_key')") == KEY, "a kiosk keeps its key"

        # A picture from the console's image box, sent to the lobby display.
        page = console.page
        page.fill("#image-prompt", "a <i>lighthouse</i> at night")
        page.fill("#image-seed", "11")
        page.fill("#image-display", "lobby")
        page.click("#image-send")
        page.wait_for_selector("#image-result[data-done=true]", timeout=120_000)
        assert page.get_attribute("#image-preview-img", "data-count") == "4", "a preview after each step"
        assert str(page.get_attribute("#image-preview-img", "src")).startswith("data:image/jpeg;base64,")
        assert page.evaluate("document.getElementById('image-result').naturalWidth") == 64
        src = page.get_attribute("#image-result", "src")
        first = hashlib.sha256(httpx.get(rig.url + str(src), timeout=10).content).hexdigest()
        wait_shown(kiosk, first)
        # The previews went the same way, through the display's topics, before the picture.
        assert kiosk.evaluate("Number(document.body.dataset.previews || 0)") >= 1, "the display saw them too"
        caption = "(text) => document.getElementById('caption').textContent === text"
        kiosk.wait_for_function(caption, arg="a <i>lighthouse</i> at night")
        assert kiosk.eval_on_selector_all("#caption i", "xs => xs.length") == 0, "text, not markup"
        assert kiosk.evaluate("document.querySelector('.layer.shown').naturalWidth") == 64

        # A picture over MQTT swaps in with a crossfade.
        second = mqtt_picture(rig, "d2", "a forest in fog", 12)
        assert second != first
        wait_shown(kiosk, second)
        kiosk.wait_for_function(caption, arg="a forest in fog")
        assert kiosk.evaluate("document.querySelectorAll('.layer.shown').length") == 1

        # A picture someone else publishes on the display's topic (a Node-RED flow, say) shows too.
        dusk = dusk_picture()
        rig.mqtt.publish(f"{BASE}/display/lobby", dusk)
        rig.mqtt.publish(f"{BASE}/display/lobby/meta", {"prompt": "dusk over the sculpture garden",
                                                         "sha256": hashlib.sha256(dusk).hexdigest()})
        wait_shown(kiosk, hashlib.sha256(dusk).hexdigest())
        kiosk.wait_for_function(caption, arg="dusk over the sculpture garden")
        time.sleep(0.5)
        kiosk.screenshot(path=str(DOCS / "display.png"))

        # The broker restarts: the appliance and its display feed reconnect, and the next picture shows.
        rig.broker.restart(down_for=1.0)
        rig.mqtt.close()
        rig.mqtt = Client(rig.broker.port)  # the test's own client starts afresh
        assert rig.app.link.subscribed.wait(30)
        third = mqtt_picture(rig, "d3", "a harbour at dawn", 13)
        wait_shown(kiosk, third)

        assert display.problems == [], display.problems
        assert display.csp() == []

        # The appliance restarts: the page reconnects by itself, keeps its picture, and shows the next.
        swaps = kiosk.evaluate("document.body.dataset.swaps")
        rig.app.stop()
        kiosk.wait_for_function("() => document.body.dataset.link === 'connecting'", timeout=10_000)
        rig.start_app()
        kiosk.wait_for_function("() => document.body.dataset.link === 'live'", timeout=30_000)
        assert shown(kiosk) == third and kiosk.evaluate("document.body.dataset.swaps") == swaps
        fourth = mqtt_picture(rig, "d4", "a bridge in snow", 14)
        wait_shown(kiosk, fourth)
        assert all("ERR_CONNECTION_REFUSED" in p for p in display.problems), display.problems
    finally:
        kiosk.context.close()
