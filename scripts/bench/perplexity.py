"""Perplexity of the fp32 bundle, the 4-bit bundle and llama.cpp on one text (``bench_llm --perplexity``).

The shipped text (perplexity_text.txt, written for this bench and free of rights) is tokenized
once with the bundle's tokenizer, and every runner is fed exactly those ids (teacher forcing):
the twin through its layer stack (the first token prefilled, then one decode per token, the path
``--agreement`` uses), llama.cpp (llama-cpp-python, on the demo GGUF, the very file the bundles
are converted from) as one batch with ``logits_all``. Each token after the first is scored by the
log-probability the runner gave it; perplexity is exp of the mean negative log-probability.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

TEXT_FILE = Path(__file__).with_name("perplexity_text.txt")


def _nll(logits: np.ndarray, token: int) -> float:
    """Negative log-probability of ``token`` under ``logits`` (in float64, log-sum-exp)."""
    row = logits.astype(np.float64).reshape(-1)
    top = row.max()
    return float(top + math.log(np.exp(row - top).sum()) - row[token])


def _twin_nlls(runner, ids: list[int]) -> list[float]:  # type: ignore[no-untyped-def]
    stack, cache = runner.stack, runner.stack.new_cache()
    hidden = stack.prefill_chunk(cache, ids[:1], runner.embedding.lookup(ids[:1]))
    nlls = []
    for step, token in enumerate(ids[1:]):
        nlls.append(_nll(stack.logits(hidden), token))
        if step + 2 < len(ids):
            hidden = stack.decode(cache, token, runner.embedding.lookup([token]))
    return nlls


def _llama_nlls(llm, ids: list[int]) -> list[float]:  # type: ignore[no-untyped-def]
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[: len(ids)])
    return [_nll(scores[i], token) for i, token in enumerate(ids[1:])]


def _row(name: str, nlls: list[float]) -> tuple[str, float]:
    mean = sum(nlls) / len(nlls)
    ppl = math.exp(mean)
    return f"| {name} | {ppl:.3f} | {mean:.4f} |", ppl


def main(models_dir: Path, threads: int | None) -> int:
    from appliance.demo_model import find_demo_gguf
    from npu.llm.runner import LLMRunner
    from npu.runtime.onnx_backend import default_threads
    from scripts.bench.llm import current_demo_bundle
    from scripts.bench.vs_llama_cpp import import_llama_cpp

    threads = threads or default_threads()
    text = TEXT_FILE.read_text(encoding="utf-8").strip()
    fp32 = LLMRunner.load(current_demo_bundle(models_dir, None), backend="onnx", threads=threads)
    ids = fp32.encode(text)
    rows = [_row("twin, fp32", _twin_nlls(fp32, ids))]
    fp32.close()
    q4 = LLMRunner.load(current_demo_bundle(models_dir, 4), backend="onnx", threads=threads)
    rows.append(_row("twin, 4-bit", _twin_nlls(q4, ids)))
    q4.close()
    llama_cpp = import_llama_cpp()
    gguf = find_demo_gguf()
    llama = "not available"
    if llama_cpp is not None and gguf is not None:
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(512, len(ids)), n_batch=512, n_threads=threads,
                              logits_all=True, verbose=False)
        name = f"llama.cpp ({gguf.suffixes[-2].lstrip('.')}, llama-cpp-python {llama_cpp.__version__})"
        row, ppl = _row(name, _llama_nlls(llm, ids))
        rows.append((row, ppl))
        llama = f"{ppl:.3f}"
        llm.close()
    else:
        missing = "| llama.cpp | not available here (llama-cpp-python could not be installed) | |"
        rows.append((missing, math.nan))
    scored = len(ids) - 1
    print(f"{TEXT_FILE.name}: {len(ids)} tokens (the bundle's tokenizer), {scored} scored, teacher-forced; "
          f"threads {threads}")
    print("| runner | perplexity | mean negative log-likelihood (nats/token) |")
    print("|---|---|---|")
    for row, _ in rows:
        print(row)
    print(f"perplexity: fp32 {rows[0][1]:.3f}, twin 4-bit {rows[1][1]:.3f}, llama.cpp {llama} "
          f"({scored} tokens)")
    return 0
