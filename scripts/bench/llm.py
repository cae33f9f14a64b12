"""Benchmark of the LLM runner on the CPU twin (or the NPU where present).

Each bundle variant runs in its own process so that peak resident memory is that variant's.
Figures are printed as a Markdown table for docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from npu.llm.kv_cache import CachePool  # noqa: E402
from npu.llm.params import GenerationParams  # noqa: E402
from npu.llm.runner import LLMRunner  # noqa: E402

GREEDY = GenerationParams(max_tokens=64, temperature=0.0)
TEXT = (
    "The gallery opens at nine. Visitors walk past a wall of sensors that listen for footsteps, "
    "and every few minutes the installation writes a short poem about the people it has heard. "
)


class StubSession:
    """Returns fixed outputs at once: isolates the host's own work per token."""

    def __init__(self, inner, outputs: list) -> None:  # type: ignore[no-untyped-def, type-arg]
        self._inner, self._outputs = inner, outputs
        self.path, self.backend = inner.path, "stub"

    def get_inputs(self, shape_group: int = 0):  # type: ignore[no-untyped-def]
        return self._inner.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0):  # type: ignore[no-untyped-def]
        return self._inner.get_outputs(shape_group)

    def run(self, output_names, feeds, shape_group: int = 0):  # type: ignore[no-untyped-def]
        return self._outputs

    def binding(self):  # type: ignore[no-untyped-def]
        return StubBinding()


class StubBinding:
    """An IO binding whose run does nothing (the outputs keep what they hold)."""

    def value(self, array):  # type: ignore[no-untyped-def]
        return None

    def input(self, name, array, value=None) -> None:  # type: ignore[no-untyped-def]
        pass

    def output(self, name, array, value=None) -> None:  # type: ignore[no-untyped-def]
        pass

    def run(self) -> None:
        pass


class TimedBinding:
    """Adds up the time spent in an IO binding's ``run``."""

    def __init__(self, inner, clock: list[float]) -> None:  # type: ignore[no-untyped-def]
        self._inner, self._clock = inner, clock
        self.value, self.input, self.output = inner.value, inner.input, inner.output

    def run(self) -> None:
        started = time.perf_counter()
        try:
            self._inner.run()
        finally:
            self._clock[0] += time.perf_counter() - started


class TimedSession:
    """Wraps a session and adds up the time spent inside ``run``."""

    def __init__(self, inner, clock: list[float]) -> None:  # type: ignore[no-untyped-def]
        self._inner = inner
        self._clock = clock
        self.path, self.backend = inner.path, inner.backend

    def get_inputs(self, shape_group: int = 0):  # type: ignore[no-untyped-def]
        return self._inner.get_inputs(shape_group)

    def get_outputs(self, shape_group: int = 0):  # type: ignore[no-untyped-def]
        return self._inner.get_outputs(shape_group)

    def run(self, output_names, feeds, shape_group: int = 0):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return self._inner.run(output_names, feeds, shape_group=shape_group)
        finally:
            self._clock[0] += time.perf_counter() - started

    def binding(self):  # type: ignore[no-untyped-def]
        return TimedBinding(self._inner.binding(), self._clock)


def forget_bindings(stack) -> None:  # type: ignore[no-untyped-def]
    """Decode bindings are made per cache from the sessions in place; swapped sessions need new ones."""
    bound = getattr(stack, "_bound", None)
    if bound is not None:
        bound.clear()


def current_demo_bundle(models_dir: Path, bits: int | None) -> Path:
    """The demo bundle, converted again when an older converter wrote it (its bundle format)."""
    from appliance.demo_model import ensure_demo_model, find_demo_gguf
    from npu.convert import bundle_is_current, convert_gguf

    bundle = ensure_demo_model(models_dir, bits=bits)
    gguf = find_demo_gguf()
    if not bundle_is_current(bundle) and gguf is not None:
        print(f"converting {bundle.name} again: an older bundle format", file=sys.stderr, flush=True)
        convert_gguf(gguf, bundle, bits=bits, overwrite=True)
    return bundle


def prompt_of(runner: LLMRunner, tokens: int, salt: str) -> list[dict[str, str]]:
    words = (salt + " " + TEXT * 40).split(" ")
    lo, hi = 1, len(words)
    while lo < hi:  # the longest text whose chat prompt fits the token budget
        mid = (lo + hi + 1) // 2
        if len(runner.encode_chat([{"role": "user", "content": " ".join(words[:mid])}])) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return [{"role": "user", "content": " ".join(words[:lo])}]


def fresh_pool(runner: LLMRunner) -> None:
    runner.pool = CachePool(1, runner.stack.new_cache)


def ttft_ms(runner: LLMRunner, messages: list[dict[str, str]]) -> tuple[float, int, int]:
    ids = runner.encode_chat(messages)
    started = time.perf_counter()
    for resp in runner.stream_generate(ids, GenerationParams(max_tokens=1, temperature=0.0)):
        if resp.finish_reason:
            return (time.perf_counter() - started) * 1e3, len(ids), resp.usage.cached_tokens
    raise RuntimeError("no token")


def measure(bundle: Path, prompt_tokens: int, decode_tokens: int, threads: int | None) -> dict[str, float]:
    clock = [0.0]
    runner = LLMRunner.load(bundle, backend="auto", threads=threads)
    stack = runner.stack
    stack.layers = [TimedSession(s, clock) for s in stack.layers]  # type: ignore[misc]
    stack.post = TimedSession(stack.post, clock)  # type: ignore[assignment]

    ttfts = []
    for i in range(3):
        fresh_pool(runner)
        ms, n_prompt, _ = ttft_ms(runner, prompt_of(runner, prompt_tokens, f"Run {i}."))
        ttfts.append(ms)

    # Decode: a fixed number of tokens, EOS ignored, timed per token.
    fresh_pool(runner)
    ids = runner.encode_chat(prompt_of(runner, 64, "Decode."))
    cache = runner.pool.acquire(ids)
    steps = runner.generate_step(ids, GenerationParams(max_tokens=decode_tokens, temperature=0.0), cache)
    next(steps)  # prefill and the first token
    clock[0] = 0.0
    started = time.perf_counter()
    for _ in range(decode_tokens):
        next(steps)
    wall = time.perf_counter() - started
    session_s = clock[0]
    # The same decode loop with every session answering instantly: the host's own work.
    layers, post = stack.layers, stack.post
    hidden = np.zeros((1, 1, runner.args.hidden_size), np.float32)
    row = np.zeros((1, 1, runner.args.kv_dim), np.float32)
    stack.layers = [StubSession(s, [row, row, hidden]) for s in layers]  # type: ignore[misc]
    stack.post = StubSession(post, [np.zeros((1, 1, runner.args.vocab_size), np.float32)])  # type: ignore[assignment]
    forget_bindings(stack)
    stubbed = 200
    started = time.perf_counter()
    for _ in range(stubbed):
        next(steps)
    host_only_ms = (time.perf_counter() - started) / stubbed * 1e3
    stack.layers, stack.post = layers, post
    forget_bindings(stack)
    steps.close()
    runner.pool.release(cache)

    # Second chat turn: the whole history resent, with the prefix reused against a cold cache.
    fresh_pool(runner)
    turn1 = prompt_of(runner, prompt_tokens, "Turn one.")
    answer = runner.generate(runner.encode_chat(turn1), GREEDY).text
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "Say it shorter."}]
    warm_ms, turn2_tokens, cached = ttft_ms(runner, turn2)
    fresh_pool(runner)
    cold_ms, _, _ = ttft_ms(runner, turn2)

    return {
        "prompt_tokens": n_prompt,
        "ttft_ms": statistics.median(ttfts),
        "decode_tps": decode_tokens / wall,
        "host_overhead_ms": (wall - session_s) / decode_tokens * 1e3,
        "host_only_ms": host_only_ms,
        "turn2_tokens": turn2_tokens,
        "turn2_cached": cached,
        "turn2_warm_ms": warm_ms,
        "turn2_cold_ms": cold_ms,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "backend": runner.backend,  # type: ignore[dict-item]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sim-card", action="store_true",
                        help="bytes and calls over the simulated card's bus: PyAXEngine path, resident KV")
    parser.add_argument("--bits", type=int, choices=(4, 32), default=None,
                        help="only this bundle (4-bit or fp32); --against-llama-cpp defaults to 4")
    parser.add_argument("--against-llama-cpp", action="store_true",
                        help="the twin and llama.cpp (llama-cpp-python, installed on demand) on the same "
                             "GGUF, prompt and threads, greedy: prefill and decode tok/s and their ratio")
    parser.add_argument("--rounds", type=int, default=3,
                        help="--against-llama-cpp: runs of each, in turn; the figures are their medians")
    parser.add_argument("--agreement", action="store_true",
                        help="greedy agreement of the 4-bit bundle and llama.cpp with the fp32 bundle")
    parser.add_argument("--perplexity", action="store_true",
                        help="perplexity of the fp32 and 4-bit bundles and llama.cpp on a shipped text, "
                             "the same token ids teacher-forced into each")
    args = parser.parse_args()
    if args.perplexity:
        from scripts.bench.perplexity import main as perplexity

        return perplexity(args.models_dir, args.threads)
    if args.agreement:
        from scripts.bench.agreement import main as agreement

        return agreement(args.models_dir, args.threads)
    if args.against_llama_cpp:
        from scripts.bench.vs_llama_cpp import main as against_llama_cpp

        bits = 4 if args.bits in (None, 4) else None
        return against_llama_cpp(args.models_dir, bits, args.prompt_tokens, args.decode_tokens, args.threads,
                                 args.rounds)
    if args.sim_card:
        from scripts.bench.sim_card import main as sim_card

        return sim_card(args.models_dir)
    if args.one:
        print(json.dumps(measure(args.one, args.prompt_tokens, args.decode_tokens, args.threads)))
        return 0

    variants = {}
    if args.bits in (None, 32):
        variants["fp32"] = current_demo_bundle(args.models_dir, None)
    if args.bits in (None, 4):
        variants["4-bit"] = current_demo_bundle(args.models_dir, 4)
    rows = {}
    for name, bundle in variants.items():
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(bundle),
            "--prompt-tokens",
            str(args.prompt_tokens),
            "--decode-tokens",
            str(args.decode_tokens),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    print(
        f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
        f"python {platform.python_version()}; threads: {args.threads or 'default'}"
    )
    print(
        "| weights | backend | TTFT, 300-token prompt | decode tok/s | wall − session time / token | "
        "host work / token (sessions stubbed) | turn-2 TTFT reused (cached) | turn-2 TTFT cold | peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['backend']} | {r['ttft_ms']:.0f} ms ({r['prompt_tokens']} tok) | "
            f"{r['decode_tps']:.1f} | {r['host_overhead_ms']:.3f} ms | {r['host_only_ms']:.3f} ms | "
            f"{r['turn2_warm_ms']:.0f} ms ({r['turn2_cached']}/{r['turn2_tokens']} tok) | "
            f"{r['turn2_cold_ms']:.0f} ms | {r['peak_rss_mb']:.0f} MB |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
