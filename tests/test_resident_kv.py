"""The device-resident KV cache on the simulated card's pyaxcl face (tests/fake_axcl_engine.py).

The same greedy text as the CPU twin and as the PyAXEngine path, across chunks, a reused second
turn and interleaved conversations; a cache that does not fit the card is refused; every device
buffer is freed by close, reload, recovery and stop.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import fake_axcl_engine as fx
import fake_axengine as fa
import pytest
from engine_jobs import Job

from npu.device.sim import SimMonitor
from npu.engine.api import Done, ErrorCode, Failed
from npu.engine.engine import Engine, EngineConfig
from npu.engine.recovery import RecoveryConfig
from npu.engine.worker import ModelSpec
from npu.llm.kv_cache import CacheMemoryError, CachePool
from npu.llm.params import GenerationParams
from npu.llm.runner import LLMRunner
from npu.runtime import axcl_backend

GREEDY = GenerationParams(max_tokens=20, temperature=0.0)
LONG = "Summarise: " + " ".join(f"Room {i} holds a painting of the sea at hour {i % 12}." for i in range(14))
TURN1 = [{"role": "user", "content": LONG}]


@pytest.fixture(scope="module")
def bundle(demo_bundle_fp32: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two decode groups (the small one last), prefill groups first, a (1, 1, hidden) placeholder."""
    layout = fa.Layout(decode=(2047, 192), prefill=(0, 128, 256, 384), placeholder="hidden", dtype="float32",
                       decode_first=False)
    return fa.make_npu_bundle(demo_bundle_fp32, tmp_path_factory.mktemp("resident") / "npu", layout)


@pytest.fixture
def axcl(monkeypatch: pytest.MonkeyPatch) -> Iterator:  # type: ignore[type-arg]
    """A fresh simulated card behind ``import axcl``."""
    module = fx.make_axcl()
    monkeypatch.setitem(sys.modules, "axcl", module)
    axcl_backend.reset_runtime()
    yield module
    axcl_backend.reset_runtime()


@pytest.fixture(scope="module")
def twin(demo_bundle_fp32: Path) -> LLMRunner:
    return LLMRunner.load(demo_bundle_fp32, backend="onnx")


def two_turns(runner: LLMRunner) -> tuple[str, str, int]:
    first = runner.generate(runner.encode_chat(TURN1), GREEDY)
    turn2 = [*TURN1, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter."}]
    second = runner.generate(runner.encode_chat(turn2), GREEDY)
    return first.text, second.text, second.usage.cached_tokens


def test_resident_path_gives_the_twins_and_pyaxengines_text(
    bundle: Path, twin: LLMRunner, axcl, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    runner = LLMRunner.load(bundle, backend="auto")
    assert runner.backend == "axcl", "auto takes pyaxcl first when it and the card are there"
    runner.warm_up()  # a short prompt: it decodes on the 192-row group
    monkeypatch.setitem(sys.modules, "axengine", fa.make_module())
    pyaxengine = LLMRunner.load(bundle, backend="axengine")
    twin.pool = CachePool(1, twin.stack.new_cache)
    expected = two_turns(twin)
    assert expected[2] >= 128, "the second turn reuses whole chunks of the first"
    assert two_turns(runner) == expected
    assert two_turns(pyaxengine) == expected
    groups = {g for name, g in axcl.bus.runs if "_post" not in name}
    assert {0, 1, 2, 4, 5} <= groups, "both decode groups and several prefill groups ran on the card"
    runner.close()
    pyaxengine.close()
    assert axcl.leaks() == {"buffers": 0, "ios": 0, "io_infos": 0, "models": 0, "contexts": 0}
    assert axcl.card.cmm_used == 0


def test_a_decode_token_moves_one_upload_and_the_logits(bundle: Path, axcl) -> None:  # type: ignore[no-untyped-def]
    runner = LLMRunner.load(bundle, backend="axcl")
    ids = runner.encode_chat(TURN1)
    cache = runner.pool.acquire(ids)
    steps = runner.generate_step(ids, GREEDY, cache)
    for _ in range(3):
        while next(steps).token is None:
            pass
    before = axcl.bus.snapshot()
    next(steps)  # one decode token and its logits
    after = axcl.bus.snapshot()
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    layers = runner.args.num_hidden_layers
    assert moved["h2d"] == 1 and moved["d2h"] == 1 and moved["execute"] == layers + 1
    assert moved["d2d"] == 2 * layers, "each layer's new K and V row, copied on the card"
    vocab_bytes = runner.args.vocab_size * 4  # this bundle's logits are fp32
    assert moved["d2h_bytes"] == vocab_bytes and moved["h2d_bytes"] < 4096
    assert not any(k.startswith("host:") and v for k, v in moved.items()), "no rebinding per token"
    steps.close()
    runner.pool.release(cache)
    runner.close()


def test_interleaved_conversations_keep_their_own_rows(bundle: Path, twin: LLMRunner, axcl) -> None:  # type: ignore[no-untyped-def]
    runner = LLMRunner.load(bundle, backend="axcl", cache_slots=2)
    prompts = [runner.encode_chat([{"role": "user", "content": text}])
               for text in ("Describe a lighthouse at night.", LONG)]
    expected = [twin.generate(p, GREEDY).text for p in prompts]
    streams = [runner.stream_generate(p, GREEDY) for p in prompts]
    texts = ["", ""]
    alive = [True, True]
    while any(alive):
        for i, stream in enumerate(streams):
            if alive[i]:
                try:
                    texts[i] += next(stream).text
                except StopIteration:
                    alive[i] = False
    assert texts == expected
    runner.close()


def test_a_cache_the_card_cannot_hold_is_refused(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = fx.SimCard()
    module = fx.make_axcl(card)
    monkeypatch.setitem(sys.modules, "axcl", module)
    axcl_backend.reset_runtime()
    runner = LLMRunner.load(bundle, backend="axcl", cache_slots=2)
    one_cache = 2 * 2047 * 192 * 4 * runner.args.num_hidden_layers
    card.cmm_total = card.cmm_used + one_cache + 2**20  # room for one conversation, not two
    first = runner.pool.acquire([1, 2, 3])
    with pytest.raises(CacheMemoryError, match=r"KV cache needs \d+ MiB"):
        runner.pool.acquire([4, 5, 6])
    runner.pool.release(first)
    runner.close()
    assert module.leaks()["buffers"] == 0, "a refused cache leaves nothing allocated"
    axcl_backend.reset_runtime()


def test_reload_recovery_and_stop_free_every_device_buffer(bundle: Path, axcl) -> None:  # type: ignore[no-untyped-def]
    sim = SimMonitor(reset_seconds=0.05)
    engine = Engine([ModelSpec("demo", "chat", bundle, runtime="axcl")], config=EngineConfig(max_active=2),
                    monitor=sim, recovery=RecoveryConfig(attempts=2, backoff=0.1))
    engine.start(timeout=120)
    try:
        assert Job(engine, GREEDY).handle.wait(60)
        loaded = axcl.card.cmm_used
        engine.reload(timeout=120)
        assert axcl.card.cmm_used == loaded, "a reload frees the old model's buffers before the new ones"
        answer = Job(engine, GREEDY)
        assert answer.handle.wait(60) and isinstance(answer.final, Done)
        engine.restart("test")
        deadline = threading.Event()
        for _ in range(600):
            if engine.state().state == "idle":
                break
            deadline.wait(0.1)
        assert engine.state().state == "idle"
        after = Job(engine, GREEDY)
        assert after.handle.wait(60) and isinstance(after.final, Done)
        assert axcl.card.cmm_used <= loaded + 2 * 2**20
    finally:
        engine.stop()
        sim.close()
    assert axcl.leaks() == {"buffers": 0, "ios": 0, "io_infos": 0, "models": 0, "contexts": 0}


def test_a_full_card_is_a_busy_refusal_not_a_crash(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = fx.SimCard()
    monkeypatch.setitem(sys.modules, "axcl", fx.make_axcl(card))
    axcl_backend.reset_runtime()
    engine = Engine([ModelSpec("demo", "chat", bundle, runtime="axcl")], config=EngineConfig(max_active=2))
    engine.start(timeout=120)
    try:
        card.cmm_total = card.cmm_used + 2**20  # the warm-up's cache exists; no room for a second
        a = Job(engine, GREEDY, "Tell a long story about a lighthouse.")
        b = Job(engine, GREEDY, "Tell a story about a forest.")
        assert a.handle.wait(60) and b.handle.wait(60)
        finals = [a.final, b.final]
        assert sum(isinstance(f, Done) for f in finals) >= 1
        refused = [f for f in finals if isinstance(f, Failed)]
        assert all(f.error.code == ErrorCode.BUSY and "memory is full" in f.error.message for f in refused)
    finally:
        engine.stop()
        axcl_backend.reset_runtime()
