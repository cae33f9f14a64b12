"""The per-layer CPU stack: decode attends over the rows in use, prefill runs unpadded, same results.

It runs a bundle's per-layer graphs (a bundle without a twin graph, converted before format 3).
The static path (``LayerStack``, the NPU's way: every decode over the whole cache, every chunk
padded to 128) runs on the same sessions as the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from npu.llm.layer_stack import LayerStack, find_bundle_files, plan_layers
from npu.llm.onnx_stack import OnnxLayerStack
from npu.llm.runner import LLMRunner
from npu.runtime.factory import open_sessions


def per_layer_stack(bundle: Path, runner: LLMRunner) -> OnnxLayerStack:
    """The bundle's per-layer graphs on ONNX Runtime, as a bundle without a twin graph runs."""
    files = find_bundle_files(bundle, runner.args.num_hidden_layers, ".onnx")
    _, sessions = open_sessions(bundle, lambda _: [*files.layer_stems, files.post_stem], "onnx")
    return OnnxLayerStack(sessions[:-1], sessions[-1], runner.args, plan_layers(sessions[:-1], runner.args))


class _Spy:
    """Records the mask and input shapes each layer-0 run or bound run sees."""

    def __init__(self, inner, seen: list[tuple[str, tuple[int, ...]]]) -> None:  # type: ignore[no-untyped-def]
        self._inner, self._seen = inner, seen
        self.path, self.backend, self.group_count = inner.path, inner.backend, inner.group_count

    def get_inputs(self, shape_group: int = 0):  # type: ignore[no-untyped-def]
        return self._inner.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0):  # type: ignore[no-untyped-def]
        return self._inner.get_outputs(shape_group)

    def run(self, output_names, feeds, shape_group: int = 0):  # type: ignore[no-untyped-def]
        self._seen.append(("prefill", feeds["input"].shape))
        return self._inner.run(output_names, feeds, shape_group)

    def binding(self):  # type: ignore[no-untyped-def]
        inner, seen = self._inner.binding(), self._seen

        class Bound:
            value, output = inner.value, inner.output

            def input(self, name, array, value=None):  # type: ignore[no-untyped-def]
                if name == "mask":
                    seen.append(("decode", array.shape))
                inner.input(name, array, value)

            def run(self) -> None:
                inner.run()

        return Bound()

    def close(self) -> None:
        self._inner.close()


def _greedy(
    stack: LayerStack, runner: LLMRunner, prompt: list[int], steps: int
) -> tuple[list[int], np.ndarray]:
    cache = stack.new_cache()
    hidden = None
    for start in range(0, len(prompt), stack.chunk):
        ids = prompt[start : start + stack.chunk]
        hidden = stack.prefill_chunk(cache, ids, runner.embedding.lookup(ids))
    tokens, logits = [], np.empty(0)
    for _ in range(steps):
        logits = stack.logits(hidden)
        tokens.append(int(np.argmax(logits)))
        hidden = stack.decode(cache, tokens[-1], runner.embedding.lookup(tokens[-1:]))
    return tokens, logits


def test_decode_attends_over_rows_in_use_and_matches_the_static_path(
    tiny_bundles: dict[str, tuple[Path, Path]],
) -> None:
    _, bundle = tiny_bundles["qwen2"]
    runner = LLMRunner.load(bundle, backend="onnx")
    stack = per_layer_stack(bundle, runner)
    seen: list[tuple[str, tuple[int, ...]]] = []
    layers = [_Spy(stack.layers[0], seen), *stack.layers[1:]]
    spied = OnnxLayerStack(layers, stack.post, stack.args, stack.plan)  # type: ignore[arg-type]
    static = LayerStack(stack.layers, stack.post, stack.args, stack.plan)
    prompt = np.random.default_rng(3).integers(10, runner.args.vocab_size - 10, 133).tolist()

    tokens, logits = _greedy(spied, runner, prompt, 4)
    ref_tokens, ref_logits = _greedy(static, runner, prompt, 4)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)
    hidden = runner.args.hidden_size
    # Prefill: a whole chunk, then the 5 remaining tokens unpadded; decode: the rows stored + itself.
    assert seen == [("prefill", (1, 128, hidden)), ("prefill", (1, 5, hidden)),
                    *(("decode", (1, 1, 133 + i + 1)) for i in range(4))]
    stack.close()
    runner.close()


def test_two_conversations_keep_their_own_bindings(tiny_bundles: dict[str, tuple[Path, Path]]) -> None:
    """Alternating decode between two caches (two jobs) gives each its own answer."""
    _, bundle = tiny_bundles["llama"]
    runner = LLMRunner.load(bundle, backend="onnx")
    stack = per_layer_stack(bundle, runner)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(10, runner.args.vocab_size - 10, n).tolist() for n in (7, 19)]
    alone = [_greedy(stack, runner, p, 6)[0] for p in prompts]
    caches = [stack.new_cache() for _ in prompts]
    hidden = []
    for cache, p in zip(caches, prompts, strict=True):
        hidden.append(stack.prefill_chunk(cache, p, runner.embedding.lookup(p)))
    together: list[list[int]] = [[], []]
    for _ in range(6):
        for i, cache in enumerate(caches):
            together[i].append(int(np.argmax(stack.logits(hidden[i]))))
            hidden[i] = stack.decode(cache, together[i][-1], runner.embedding.lookup(together[i][-1:]))
    assert together == alone
    stack.close()
    runner.close()
