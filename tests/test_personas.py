"""Personas: a system prompt prefilled at load and kept warm, rebuilt after a card recovery.

The warm-start test runs on the simulated card's pyaxcl face (``tests/fake_axcl_engine.py``), so
the kept rows live in device buffers and are copied device to device, as on the card; the
equivalence test runs on the CPU twin.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import fake_axcl_engine as fx
import fake_axengine as fa
import pytest

from npu.device.sim import SimMonitor
from npu.engine.api import ChatRequest, Delta, Done, JobEvent, Persona
from npu.engine.engine import Engine, EngineConfig
from npu.engine.recovery import RecoveryConfig
from npu.engine.worker import ModelSpec
from npu.llm.kv_cache import CachePool
from npu.llm.params import GenerationParams
from npu.llm.runner import LLMRunner
from npu.runtime import axcl_backend

COYOTE = (Path(__file__).resolve().parents[1] / "examples/personas/coyote.txt").read_text().strip()
QUESTIONS = ["What do you see tonight?", "Tell me about the owls.", "Why is the moon so bright?",
             "What should I look at first?", "Where do the scorpions hide?"]
# Questions long enough that a turn's own prefill, not the noise of a shared machine, sets its TTFT.
LONG = [f"{q} I walked in from the north door, past the cactus garden and the long window; the light "
        "was orange and the floor was warm. Describe it for me as you would for a child, slowly, "
        "with the colours of the hour." for q in QUESTIONS]
GREEDY = GenerationParams(max_tokens=4, temperature=0.0)


def persona_request(question: str, model: str = "demo") -> ChatRequest:
    persona = Persona("coyote", COYOTE, model)
    messages = persona.messages([{"role": "user", "content": question}])
    return ChatRequest(model=model, messages=messages, params=GREEDY)


class Timed:
    """A submitted job: when it was submitted, when its first text came, how it ended."""

    def __init__(self, engine: Engine, request: ChatRequest) -> None:
        self.first: float | None = None
        self.events: list[JobEvent] = []
        self.submitted = time.perf_counter()
        self.handle = engine.submit(request, self._sink)

    def _sink(self, event: JobEvent) -> None:
        if isinstance(event, Delta) and self.first is None:
            self.first = time.perf_counter()
        self.events.append(event)

    def result(self) -> Done:
        assert self.handle.wait(120)
        final = self.events[-1]
        assert isinstance(final, Done), final
        return final

    @property
    def ttft(self) -> float:
        self.result()
        assert self.first is not None
        return self.first - self.submitted


@pytest.fixture(scope="module")
def bundle(demo_bundle_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    layout = fa.Layout(decode=(2047, 192), prefill=(0, 128, 256, 384), placeholder="hidden", dtype="float32",
                       decode_first=False)
    return fa.make_npu_bundle(demo_bundle_fp32, tmp_path_factory.mktemp("persona") / "npu", layout)


@pytest.fixture
def axcl(monkeypatch: pytest.MonkeyPatch) -> Iterator:  # type: ignore[type-arg]
    module = fx.make_axcl()
    monkeypatch.setitem(sys.modules, "axcl", module)
    axcl_backend.reset_runtime()
    yield module
    axcl_backend.reset_runtime()


def wait_idle_state(engine: Engine, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while engine.state().state != "idle" and time.monotonic() < deadline:
        threading.Event().wait(0.05)
    assert engine.state().state == "idle"


def test_the_first_answer_after_a_card_recovery_starts_warm(demo_bundle_fp32: Path) -> None:
    """The must-show: the persona's first answer after a recovery reuses the kept prefix and
    starts within 1.5x of a warm turn, while the same prompt without a kept prefix does not."""
    sim = SimMonitor(reset_seconds=0.05)
    engine = Engine([ModelSpec("demo", "chat", demo_bundle_fp32, runtime="onnx", prefixes=(COYOTE,))],
                    config=EngineConfig(max_active=1), monitor=sim,
                    recovery=RecoveryConfig(attempts=2, backoff=0.1))
    engine.start(timeout=120)
    try:
        runner = engine.workers[0].runners["demo"]
        kept = len(runner.kept[0].tokens)  # type: ignore[attr-defined]
        assert kept >= 256, "the coyote's system prompt fills whole prefill chunks"
        first = Timed(engine, persona_request(LONG[0])).result().result
        assert first.usage.cached_tokens == kept, "even the first answer after the start is warm"
        # Each recovery's first answer is paired with a warm turn right after it, so both see the
        # same load on a shared machine; the medians of three pairs are compared.
        firsts, warms = [], []
        for i in range(3):
            engine.restart("test")  # the card is rebooted, its sessions closed, the models loaded again
            wait_idle_state(engine)
            assert engine.workers[0].runners["demo"] is not runner, "the model was loaded again"
            runner = engine.workers[0].runners["demo"]
            after = Timed(engine, persona_request(LONG[1 + i]))
            assert after.result().result.usage.cached_tokens == kept, "the kept prefix was rebuilt"
            firsts.append(after.ttft)
            warms.append(Timed(engine, persona_request(LONG[2 + i])).ttft)
        warm_ttft = statistics.median(warms)
        assert statistics.median(firsts) <= 1.5 * warm_ttft, (firsts, warms)
        cold = Timed(engine, ChatRequest(model="demo", params=GREEDY, messages=[
            {"role": "system", "content": COYOTE.replace("Coyote", "Raven")},
            {"role": "user", "content": LONG[4]}]))
        assert cold.result().result.usage.cached_tokens == 0
        warm_again = Timed(engine, persona_request(LONG[0])).ttft
        assert cold.ttft > 1.5 * warm_again, ("without a kept prefix the same prompt starts slower",
                                              cold.ttft, warm_again)
    finally:
        engine.stop()
        sim.close()


def test_on_the_card_the_kept_prefix_survives_a_recovery_and_is_freed(bundle: Path, axcl) -> None:  # type: ignore[no-untyped-def]
    sim = SimMonitor(reset_seconds=0.05)
    engine = Engine([ModelSpec("demo", "chat", bundle, runtime="axcl", prefixes=(COYOTE,))],
                    config=EngineConfig(max_active=1), monitor=sim,
                    recovery=RecoveryConfig(attempts=2, backoff=0.1))
    engine.start(timeout=120)
    try:
        runner = engine.workers[0].runners["demo"]
        assert runner.backend == "axcl"
        kept = len(runner.kept[0].tokens)  # type: ignore[attr-defined]
        before = Timed(engine, persona_request(QUESTIONS[0])).result().result
        engine.restart("test")
        wait_idle_state(engine)
        after = Timed(engine, persona_request(QUESTIONS[0])).result().result
        assert after.usage.cached_tokens == before.usage.cached_tokens == kept >= 256
        assert after.text == before.text, "rows copied on the card are the rows the prefill wrote"
    finally:
        engine.stop()
        sim.close()
    assert axcl.leaks() == {"buffers": 0, "ios": 0, "io_infos": 0, "models": 0, "contexts": 0}, \
        "the kept prefix's device buffers are freed with the model"


def test_a_kept_prefix_gives_the_answer_a_cold_prompt_gives(demo_bundle_fp32: Path) -> None:
    runner = LLMRunner.load(demo_bundle_fp32, backend="onnx")
    runner.pool = CachePool(1, runner.stack.new_cache)
    prompt = runner.encode_chat(persona_request(QUESTIONS[1]).messages or [])
    params = GenerationParams(max_tokens=24, temperature=0.0)
    cold = runner.generate(prompt, params)
    assert cold.usage.cached_tokens == 0
    assert runner.keep_prefix([{"role": "system", "content": COYOTE}]) >= 256
    runner.generate(runner.encode("Something else entirely."), params)  # the one cache forgets the coyote
    warm = runner.generate(prompt, params)
    assert warm.usage.cached_tokens >= 256
    assert warm.text == cold.text, "rows copied from the kept prefix are the rows a prefill computes"
    other = runner.encode_chat([{"role": "user", "content": QUESTIONS[1]}])
    assert runner.generate(other, params).usage.cached_tokens == 0, "a prompt without it reuses nothing"
    runner.close()


def test_a_persona_puts_its_system_prompt_first_and_fills_only_what_is_left_out() -> None:
    persona = Persona("coyote", "You are Coyote.", "demo", {"temperature": 0.9, "max_tokens": 60})
    assert persona.messages([{"role": "user", "content": "hi"}]) == [
        {"role": "system", "content": "You are Coyote."}, {"role": "user", "content": "hi"}]
    joined = persona.messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert joined[0] == {"role": "system", "content": "You are Coyote.\n\nBe brief."} and len(joined) == 2
    assert persona.params({"temperature": 0.1}) == {"temperature": 0.1, "max_tokens": 60}
