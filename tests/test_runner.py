"""The LLM runner end to end on converted bundles, against Hugging Face transformers.

transformers loads the same GGUF independently (its own dequantization, weights layout and
attention); greedy decoding must produce the same tokens, through chunked prefill, decode, and
prefix reuse. The NPU code path runs against the fake PyAXEngine (static bf16 shape groups).
"""

from __future__ import annotations

import sys
from pathlib import Path

import fake_axengine
import numpy as np
import pytest
from gguf_factory import reference_model

from npu.llm.kv_cache import CachePool
from npu.llm.params import GenerationParams
from npu.llm.runner import ContextLengthError, LLMRunner

GREEDY = GenerationParams(max_tokens=32, temperature=0.0)
STEPS = 32

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write about rain."}],
    [{"role": "user", "content": "Summarise: " + "The lamps in the gallery dim when nobody is near. " * 30}],
]


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy tokens with a KV cache, EOS ignored (the runner's generate_step ignores it too)."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens: list[int] = []
        for _ in range(steps):
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def runner_greedy(runner: LLMRunner, prompt: list[int], steps: int) -> list[int]:
    cache = runner.pool.acquire(prompt)
    try:
        tokens: list[int] = []
        gen = runner.generate_step(prompt, GREEDY, cache)
        for step in gen:
            if step.token is not None:
                tokens.append(step.token)
                if len(tokens) == steps:
                    break
        gen.close()
    finally:
        runner.pool.release(cache)
    return tokens


@pytest.fixture(scope="module")
def demo_runner(demo_bundle_fp32: Path) -> LLMRunner:
    return LLMRunner.load(demo_bundle_fp32, backend="onnx", cache_slots=2)


@pytest.fixture(scope="module")
def demo_hf(demo_gguf_path: Path):  # type: ignore[no-untyped-def]
    return reference_model(demo_gguf_path)


@pytest.mark.reference
@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_demo_greedy_matches_transformers(demo_runner: LLMRunner, demo_hf, index: int) -> None:  # type: ignore[no-untyped-def]
    prompt = demo_runner.encode_chat(PROMPTS[index])
    if index == 2:
        assert len(prompt) > 2 * demo_runner.stack.chunk, "this prompt must span several prefill chunks"
    demo_runner.pool = CachePool(1, demo_runner.stack.new_cache)  # cold
    assert runner_greedy(demo_runner, prompt, STEPS) == hf_greedy(demo_hf, prompt, STEPS)


@pytest.mark.reference
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_greedy_match_transformers(tiny_bundles: dict, arch: str) -> None:  # type: ignore[type-arg]
    gguf, bundle = tiny_bundles[arch]
    runner = LLMRunner.load(bundle, backend="onnx")
    model = reference_model(gguf)
    rng = np.random.default_rng(7)
    for length in (5, 127, 128, 129, 300):
        prompt = rng.integers(10, runner.args.vocab_size - 10, length).tolist()
        assert runner_greedy(runner, prompt, STEPS) == hf_greedy(model, prompt, STEPS), f"prompt of {length}"


def test_seeded_sampling_is_reproducible_and_seeds_differ(demo_runner: LLMRunner) -> None:
    prompt = demo_runner.encode_chat(PROMPTS[1])
    params = GenerationParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    first = demo_runner.generate(prompt, params).text
    assert demo_runner.generate(prompt, params).text == first
    others = {demo_runner.generate(prompt, GenerationParams(max_tokens=24, temperature=0.9, seed=s)).text
              for s in range(4)}
    assert len(others) > 1


def test_streamed_deltas_join_to_the_whole_text_and_usage_counts(demo_runner: LLMRunner) -> None:
    prompt = demo_runner.encode_chat(PROMPTS[0])
    items = list(demo_runner.stream_generate(prompt, GenerationParams(max_tokens=20, temperature=0.0)))
    last = items[-1]
    assert [i.finish_reason for i in items[:-1]] == [None] * (len(items) - 1)
    assert last.finish_reason in ("stop", "length")
    assert last.usage.prompt_tokens == len(prompt)
    assert 0 < last.usage.completion_tokens <= 20
    assert all("\ufffd" not in i.text for i in items)
    whole = demo_runner.generate(prompt, GenerationParams(max_tokens=20, temperature=0.0))
    assert "".join(i.text for i in items) == whole.text


def test_max_tokens_gives_length(demo_runner: LLMRunner) -> None:
    prompt = demo_runner.encode_chat(PROMPTS[2])
    out = demo_runner.generate(prompt, GenerationParams(max_tokens=3, temperature=0.0))
    assert out.finish_reason == "length" and out.usage.completion_tokens == 3 and out.text


def test_stop_string_cuts_the_text_and_never_leaks(demo_runner: LLMRunner) -> None:
    prompt = demo_runner.encode_chat(PROMPTS[1])
    free = demo_runner.generate(prompt, GenerationParams(max_tokens=40, temperature=0.0)).text
    words = free.split()
    assert len(words) > 4, free
    stop = words[3]
    cut = free[: free.index(stop)]
    params = GenerationParams(max_tokens=40, temperature=0.0, stop=(stop,))
    items = list(demo_runner.stream_generate(prompt, params))
    assert items[-1].finish_reason == "stop"
    assert "".join(i.text for i in items) == cut
    assert all(stop not in i.text for i in items)


def test_prompt_over_the_context_is_refused_naming_both_lengths(demo_runner: LLMRunner) -> None:
    limit = demo_runner.max_prompt_tokens
    prompt = [42] * (limit + 5)
    with pytest.raises(ContextLengthError) as err:
        list(demo_runner.stream_generate(prompt, GREEDY))
    assert str(limit + 5) in str(err.value) and str(limit) in str(err.value)
    with pytest.raises(ValueError, match="empty"):
        list(demo_runner.stream_generate([], GREEDY))


def test_prefix_reuse_reports_cached_tokens_and_equals_a_cold_run(demo_runner: LLMRunner) -> None:
    demo_runner.pool = CachePool(1, demo_runner.stack.new_cache)
    turn1 = PROMPTS[2]
    params = GenerationParams(max_tokens=16, temperature=0.0)
    first = demo_runner.generate(demo_runner.encode_chat(turn1), params)
    assert first.usage.cached_tokens == 0
    turn2 = [*turn1, {"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter."}]
    ids = demo_runner.encode_chat(turn2)
    warm = demo_runner.generate(ids, params)
    assert warm.usage.cached_tokens >= 256 and warm.usage.cached_tokens % 128 == 0
    demo_runner.pool = CachePool(1, demo_runner.stack.new_cache)
    cold = demo_runner.generate(ids, params)
    assert cold.usage.cached_tokens == 0
    assert warm.text == cold.text


def test_npu_path_through_fake_axengine(
    demo_bundle_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_runner: LLMRunner
) -> None:
    record = fake_axengine.Record()
    card = fake_axengine.Card(ids=[1, 3])  # two cards: index 1 is the one on bus 3
    monkeypatch.setitem(sys.modules, "axengine", fake_axengine.make_module(record, card=card))
    npu_bundle = fake_axengine.make_npu_bundle(demo_bundle_fp32, tmp_path / "npu")
    runner = LLMRunner.load(npu_bundle, backend="auto", device_id=1)
    assert runner.backend == "axengine"
    assert {(s["device_index"], s["device_id"]) for s in record.sessions} == {(1, 3)}
    assert all(s["kwargs"] == {} for s in record.sessions), "the device goes in provider_options only"
    prompt = runner.encode_chat(PROMPTS[2])
    out = runner.generate(prompt, GenerationParams(max_tokens=8, temperature=0.0))
    assert out.usage.completion_tokens > 0 and out.text.strip()
    groups = {g for name, g in record.runs if "_post" not in name}
    chunks = -(-len(prompt) // 128)
    assert groups == set(range(chunks + 1)), "decode group 0 and one prefill group per chunk"
    # bf16 on the device versus fp32 on the CPU: the same first token on this prompt.
    cpu = demo_runner.generate(prompt, GenerationParams(max_tokens=1, temperature=0.0))
    assert out.text.startswith(cpu.text)


def test_forcing_the_npu_backend_without_axengine_is_a_clear_error(
    demo_bundle_fp32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from npu.runtime import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "axengine", None)  # import axengine -> ImportError
    npu_bundle = fake_axengine.make_npu_bundle(demo_bundle_fp32, tmp_path / "npu")
    with pytest.raises(BackendUnavailableError, match="PyAXEngine"):
        LLMRunner.load(npu_bundle, backend="axengine")
    with pytest.raises(BackendUnavailableError, match="convert"):
        LLMRunner.load(npu_bundle, backend="auto")  # .axmodel only, no NPU: say how to get a CPU bundle
