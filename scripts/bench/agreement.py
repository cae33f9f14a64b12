"""Greedy agreement of the 4-bit bundle and llama.cpp with the fp32 one (``bench_llm --agreement``).

The fp32 bundle, which matches transformers token for token, answers a fixed set of prompts
greedily. Each other runner is then fed the same prompt and the same answer tokens (teacher
forcing), and at every step its own greedy choice is compared with the fp32 one: the share of
steps where they agree, and how many answers agree in full.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a sensor does in one sentence.",
    "List three colours.",
    "How do I boil an egg?",
    "Tell me a short story about a robot.",
    "What is 12 times 7?",
    "Translate 'good morning' into French.",
)
STEPS = 32


def _twin_choices(runner, prompt: list[int], answer: list[int] | None) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy choices at each step; fed ``answer``'s tokens when given, else its own."""
    stack, cache = runner.stack, runner.stack.new_cache()
    hidden = None
    for start in range(0, len(prompt), stack.chunk):
        ids = prompt[start : start + stack.chunk]
        hidden = stack.prefill_chunk(cache, ids, runner.embedding.lookup(ids))
    choices: list[int] = []
    for step in range(STEPS):
        choices.append(int(np.argmax(stack.logits(hidden))))
        fed = answer[step] if answer is not None else choices[-1]
        hidden = stack.decode(cache, fed, runner.embedding.lookup([fed]))
    return choices


def _llama_choices(llm, prompt: list[int], answer: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    from scripts.bench.vs_llama_cpp import last_logits

    llm.reset()
    llm.eval(prompt)
    choices = []
    for step in range(STEPS):
        choices.append(int(np.argmax(last_logits(llm))))
        llm.eval([answer[step]])
    return choices


def _summary(name: str, reference: list[list[int]], got: list[list[int]]) -> str:
    steps = sum(len(r) for r in reference)
    same = sum(int(a == b) for r, g in zip(reference, got, strict=True) for a, b in zip(r, g, strict=True))
    whole = sum(int(r == g) for r, g in zip(reference, got, strict=True))
    return (f"| {name} | {same}/{steps} ({100 * same / steps:.1f}%) | {whole}/{len(reference)} |")


def main(models_dir: Path, threads: int | None) -> int:
    from appliance.demo_model import find_demo_gguf
    from npu.llm.runner import LLMRunner
    from npu.runtime.onnx_backend import default_threads
    from scripts.bench.llm import current_demo_bundle
    from scripts.bench.vs_llama_cpp import import_llama_cpp

    threads = threads or default_threads()
    fp32 = LLMRunner.load(current_demo_bundle(models_dir, None), backend="onnx", threads=threads)
    prompts = [fp32.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    reference = [_twin_choices(fp32, p, None) for p in prompts]
    fp32.close()
    q4 = LLMRunner.load(current_demo_bundle(models_dir, 4), backend="onnx", threads=threads)
    got = [_twin_choices(q4, p, r) for p, r in zip(prompts, reference, strict=True)]
    rows = [_summary("twin, 4-bit", reference, got)]
    q4.close()
    llama_cpp = import_llama_cpp()
    gguf = find_demo_gguf()
    if llama_cpp is not None and gguf is not None:
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=threads, verbose=False)
        got = [_llama_choices(llm, p, r) for p, r in zip(prompts, reference, strict=True)]
        rows.append(_summary(f"llama.cpp ({gguf.suffixes[-2].lstrip('.')})", reference, got))
        llm.close()
    else:
        rows.append("| llama.cpp | not available here (llama-cpp-python could not be installed) | |")
    print(f"{len(PROMPTS)} chat prompts, {STEPS} greedy steps each, "
          "teacher-forced on the fp32 bundle's answers")
    print("| runner | steps choosing the fp32 bundle's token | answers identical throughout |")
    print("|---|---|---|")
    for row in rows:
        print(row)
    return 0
