"""The twin graph: every layer in one run, attention on the conversation's cache in place.

The references are the same bundle's per-layer graphs (AXERA's contract) on the static path
(``LayerStack``: the NPU's way, every decode over the whole cache); transformers' own tokens
are checked through the runner in tests/test_runner.py, which runs the twin.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from npu.llm.layer_stack import LayerStack
from npu.llm.model_args import ModelArgs
from npu.llm.onnx_stack import OnnxLayerStack
from npu.llm.runner import LLMRunner
from npu.llm.twin_names import twin_file_name, weights_file_name
from npu.llm.twin_stack import HeadMajorKVCache, TwinLayerStack
from tests.test_onnx_stack import per_layer_stack


def _greedy(stack: LayerStack, runner: LLMRunner, prompt: list[int], steps: int):  # type: ignore[no-untyped-def]
    cache = stack.new_cache()
    hidden = None
    for start in range(0, len(prompt), stack.chunk):
        ids = prompt[start : start + stack.chunk]
        hidden = stack.prefill_chunk(cache, ids, runner.embedding.lookup(ids))
    tokens, logits = [], []
    for _ in range(steps):
        logits.append(stack.logits(hidden))
        tokens.append(int(np.argmax(logits[-1])))
        hidden = stack.decode(cache, tokens[-1], runner.embedding.lookup(tokens[-1:]))
    return tokens, np.stack(logits), cache


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_twin_answers_as_the_per_layer_graphs(tiny_bundles: dict[str, tuple[Path, Path]], arch: str) -> None:
    """Two prefill chunks (the second unpadded) and decode: same tokens, logits and cache rows."""
    _, bundle = tiny_bundles[arch]
    runner = LLMRunner.load(bundle, backend="onnx")
    assert isinstance(runner.stack, TwinLayerStack) and len(runner.stack.layers) == 1
    per_layer = per_layer_stack(bundle, runner)
    static = LayerStack(per_layer.layers, per_layer.post, per_layer.args, per_layer.plan)
    prompt = np.random.default_rng(11).integers(10, runner.args.vocab_size - 10, 133).tolist()

    tokens, logits, cache = _greedy(runner.stack, runner, prompt, 5)
    ref_tokens, ref_logits, ref_cache = _greedy(static, runner, prompt, 5)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
    rows = len(prompt) + 4  # the last token's row is written by the next decode
    for layer, ref in zip(cache.layers, ref_cache.layers, strict=True):
        for mine, theirs in zip(layer.history(rows), ref.history(rows), strict=True):
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-5)
    per_layer.close()
    runner.close()


def test_a_decode_token_is_one_run_writing_its_rows_in_place(
    tiny_bundles: dict[str, tuple[Path, Path]],
) -> None:
    _, bundle = tiny_bundles["llama"]
    runner = LLMRunner.load(bundle, backend="onnx")
    stack = runner.stack
    assert isinstance(stack, TwinLayerStack)
    cache = stack.new_cache()
    prompt = [5, 9, 13, 17]
    stack.prefill_chunk(cache, prompt, runner.embedding.lookup(prompt))
    keys = [layer.keys for layer in cache.layers]  # type: ignore[attr-defined]
    before = [k.copy() for k in keys]
    bound = stack._binding(cache)
    runs = []
    inner_run = bound.binding.run
    bound.binding.run = lambda: (runs.append(1), inner_run())  # type: ignore[method-assign]
    stack.decode(cache, 21, runner.embedding.lookup([21]))
    assert len(runs) == 1
    for k, old in zip(keys, before, strict=True):
        changed = np.flatnonzero(np.any(k != old, axis=(0, 1, 3)))
        assert changed.tolist() == [len(prompt)]  # exactly the new row, in the bound buffer itself
    runner.close()


def test_head_major_cache_keeps_the_cards_row_layout() -> None:
    """``history``/``write`` speak ``(1, rows, kv_heads * head_dim)``, as kept prefixes save them."""
    cache = HeadMajorKVCache(8, kv_heads=2, head_dim=3)
    rows = np.arange(3 * 6, dtype=np.float32).reshape(1, 3, 6)
    cache.write(2, rows, -rows)
    keys, values = cache.history(5)
    np.testing.assert_array_equal(keys[0, 2:5], rows[0])
    np.testing.assert_array_equal(values[0, 2:5], -rows[0])
    np.testing.assert_array_equal(cache.keys[0, 1, 2], rows[0, 0, 3:])  # head 1 of row 2
    assert not keys[0, :2].any()


def test_the_graphs_share_one_copy_of_the_weights(tiny_bundles: dict[str, tuple[Path, Path]]) -> None:
    _, bundle = tiny_bundles["qwen2"]
    args = ModelArgs.load(bundle)
    prefix = args.model_prefix or args.model_type

    def external(name: str) -> set[tuple[str, int, int]]:
        model = onnx.load(str(bundle / name), load_external_data=False)
        out = set()
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                out.add((info["location"], int(info["offset"]), int(info["length"])))
        return out

    names = [f"{prefix}_p128_l{i}_together.onnx" for i in range(args.num_hidden_layers)]
    layers = set().union(*(external(name) for name in names))
    twin = external(twin_file_name(prefix))
    assert twin and twin <= layers  # the twin graph adds no bytes of its own
    assert {loc for loc, _, _ in layers} == {weights_file_name(prefix)}
    assert (bundle / weights_file_name(prefix)).stat().st_size == max(o + n for _, o, n in layers)


def test_a_bundle_without_the_twin_graph_runs_on_its_layer_graphs(
    tiny_bundles: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    _, bundle = tiny_bundles["llama"]
    old = tmp_path / "old"
    shutil.copytree(bundle, old)
    (old / twin_file_name("llama")).unlink()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    runners = [LLMRunner.load(b, backend="onnx") for b in (bundle, old)]
    assert isinstance(runners[1].stack, OnnxLayerStack)
    answers = [_greedy(r.stack, r, prompt, 6)[0] for r in runners]
    assert answers[0] == answers[1]
    for r in runners:
        r.close()


def test_a_twin_graph_of_other_layers_is_refused_by_name(
    tiny_bundles: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    import json

    from npu.llm.shape_groups import BundleShapeError

    _, bundle = tiny_bundles["llama"]
    odd = tmp_path / "odd"
    shutil.copytree(bundle, odd)
    config = json.loads((odd / "config.json").read_text())
    config["num_hidden_layers"] -= 1
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleShapeError, match=r"llama_twin\.onnx is not a twin graph of \d+ layers"):
        LLMRunner.load(odd, backend="onnx")
