"""The prompt gate's word lists (handlers/moderation.py): whole words and phrases, case and accents
folded, per-display rules; the MQTT behaviour is in tests/test_audience_mqtt.py."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from appliance.config import ConfigError, load_config
from appliance.gate import make_gate
from handlers.moderation import Blocklist, Gate, fold

LISTED = ["mörder", "forbidden phrase", "Crème brûlée"]
FILLER = st.lists(st.sampled_from(["a", "picture", "of", "the", "sea", "Mordern", "phrases", "forbidden",
                                   "crème", "42", "!", ","]), max_size=8).map(" ".join)


def disguise(text: str, data: st.DataObject) -> str:
    """The same words in another case, with accents dropped or decomposed."""
    out = []
    for ch in text:
        ch = ch.upper() if data.draw(st.booleans()) else ch
        form = data.draw(st.sampled_from(["NFC", "NFD", "strip"]))
        if form == "strip":
            ch = "".join(c for c in unicodedata.normalize("NFD", ch) if not unicodedata.combining(c))
        out.append(unicodedata.normalize(form, ch) if form != "strip" else ch)
    return "".join(out)


@given(FILLER, FILLER, st.sampled_from(LISTED), st.data())
def test_a_listed_word_is_found_in_any_case_and_accent(before: str, after: str, word: str,
                                                       data: st.DataObject) -> None:
    blocklist = Blocklist(LISTED)
    assert blocklist.match(f"{before} {disguise(word, data)}, {after}") is not None


@given(FILLER)
def test_parts_of_words_and_broken_phrases_are_not_found(text: str) -> None:
    blocklist = Blocklist(LISTED)
    # the filler holds "Mordern", "forbidden" and "phrases", "crème": never a whole listed entry
    assert blocklist.match(text) is None


def test_fold_and_comments() -> None:
    assert fold("Crème BRÛLÉE") == "creme brulee"
    assert Blocklist(["", ["", " only a comment"][0], "  "]).size == 0


def test_a_display_adds_its_own_list_or_switches_the_gate_off() -> None:
    gate = Gate(enabled=True, blocklist=Blocklist(["storm"]), registry=CollectorRegistry(),
                displays={"kids": (None, Blocklist(["shark"]), True), "studio": (False, None, None)})
    assert gate.screen("a shark", "lobby") == (None, False)
    refusal, _ = gate.screen("a shark", "kids")
    assert refusal is not None and refusal.reason == "blocklist"
    assert gate.screen("a storm", "studio") == (None, False), "this display has no gate"
    assert gate.screen("a lighthouse", "kids") == (None, True), "the judge must still be asked"


def test_a_missing_list_stops_the_start_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "appliance.yaml"
    path.write_text("moderation: {enabled: true, blocklist: nowhere.txt}\n")
    with pytest.raises(ConfigError, match=r"nowhere\.txt"):
        make_gate(load_config(path, env={}), lambda *a, **k: None, CollectorRegistry())
    path.write_text("moderation: {enabled: false}\n")
    assert make_gate(load_config(path, env={}), lambda *a, **k: None, CollectorRegistry()) is None


def test_the_http_bridge_answers_a_refused_prompt_400_refused(demo_bundle_fp32: Path) -> None:
    from openai import BadRequestError, OpenAI

    from appliance.gate import GatedEngine
    from bridge_http.app import create_app
    from bridge_http.server import HttpServer
    from npu.engine.engine import Engine, EngineConfig
    from npu.engine.worker import ModelSpec

    engine = Engine([ModelSpec("demo", "chat", demo_bundle_fp32, runtime="onnx")], config=EngineConfig())
    engine.start(timeout=120)
    events: list[tuple[str, dict[str, object]]] = []
    gate = Gate(enabled=True, blocklist=Blocklist(LISTED), registry=engine.registry,
                event=lambda name, **fields: events.append((name, fields)))
    server = HttpServer(create_app(GatedEngine(engine, gate)), "127.0.0.1", 0)
    server.start()
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{server.bound_port}/v1", api_key="x", max_retries=0)
        with pytest.raises(BadRequestError) as refused:
            client.chat.completions.create(model="demo", max_tokens=2, n=2,
                                           messages=[{"role": "user", "content": "Say the FORBIDDEN phrase"}])
        assert refused.value.code == "refused", refused.value.body
        with pytest.raises(BadRequestError) as picture:
            client.images.generate(prompt="a portrait of the Mörder")
        assert picture.value.code == "refused", "refused before any model is looked for"
        ok = client.chat.completions.create(model="demo", max_tokens=2,
                                            messages=[{"role": "user", "content": "Mordern art"}])
        assert ok.choices[0].message.content is not None
        assert [(name, fields["kind"]) for name, fields in events] == [
            ("prompt_refused", "chat"), ("prompt_refused", "image")], "each refusal is one event"
        assert engine.state().queue_depth == 0 and engine.jobs_done == 1, "nothing refused was queued"
    finally:
        server.stop()
        engine.stop()
