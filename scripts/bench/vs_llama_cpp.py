"""The CPU twin against llama.cpp on the same GGUF (``bench_llm --against-llama-cpp``).

Both run the same prompt ids (the twin's chat template), greedy, with the same thread count, in
one run, in turn for a few rounds: prefill tokens/s (prompt to first token) and decode tokens/s,
their medians and the ratio. llama.cpp comes from
``llama-cpp-python``, installed into the venv on demand for this bench only: it is never a
dependency of the appliance.
"""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "llama-cpp-python"


@dataclass(frozen=True)
class Speed:
    prefill_tps: float
    decode_tps: float
    tokens: list[int]


# cpuinfo flag -> ggml's CMake option, for a build that names the CPU's instruction sets itself.
GGML_FLAGS = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
              "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512",
              "avx512vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
              "avx512_bf16": "GGML_AVX512_BF16"}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    lines = [line for line in text.splitlines() if line.startswith("flags")]
    return {flag for line in lines for flag in line.split(":", 1)[1].split()}


def build_env() -> dict[str, str]:
    """The environment of the build: on a CPU reporting AMX, every instruction set it has but AMX.

    llama.cpp's native build (``-march=native``) uses AMX where the CPU reports it; on the VM of
    docs/PERFORMANCE.md its AMX matmul crashed on the first batch (a segmentation fault in
    ``ggml_backend_amx_mul_mat``), while the same build without AMX runs. ``CMAKE_ARGS`` set by
    the caller wins.
    """
    env = dict(os.environ)
    flags = cpu_flags()
    if "amx_tile" in flags and "CMAKE_ARGS" not in env:
        env["CMAKE_ARGS"] = " ".join(["-DGGML_NATIVE=OFF",
                                      *(f"-D{opt}=ON" for flag, opt in GGML_FLAGS.items() if flag in flags)])
    return env


def import_llama_cpp():  # type: ignore[no-untyped-def]
    """``llama_cpp``, pip-installing it into this venv first if missing; ``None`` if it cannot be."""
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    command = [sys.executable, "-m", "pip", "install", PACKAGE]
    env = build_env()
    print(f"llama.cpp for the comparison: installing {PACKAGE} into {sys.prefix} for this bench only "
          f"(it builds llama.cpp from source, several minutes on 2 cores): {' '.join(command)}"
          + (f" with CMAKE_ARGS={env['CMAKE_ARGS']!r}" if "CMAKE_ARGS" in env else ""),
          file=sys.stderr, flush=True)
    if subprocess.run(command, check=False, env=env).returncode != 0:
        return None
    importlib.invalidate_caches()
    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        return None


def runs_here(gguf: Path) -> bool:
    """Whether the installed llama.cpp evaluates a batch without crashing (tried in a child)."""
    probe = ("import sys, llama_cpp; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, "
             "verbose=False); llm.eval([1, 2, 3])")
    done = subprocess.run([sys.executable, "-c", probe, str(gguf)], check=False, capture_output=True)
    if done.returncode == 0:
        return True
    print(f"llama.cpp: the installed {PACKAGE} failed a 3-token batch (exit {done.returncode}); rebuild it "
          f"with CMAKE_ARGS={build_env().get('CMAKE_ARGS', '-DGGML_NATIVE=OFF')!r} "
          f"'{sys.executable} -m pip install --force-reinstall --no-deps --no-cache-dir {PACKAGE}'",
          file=sys.stderr)
    return False


def last_logits(llm) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The last evaluated position's logits (llama-cpp-python keeps no scores without logits_all)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))


def run_llama_cpp(llama_cpp, gguf: Path, prompt: list[int], decode_tokens: int, threads: int,  # type: ignore[no-untyped-def]
                  n_ctx: int) -> Speed:
    """Prefill ``prompt`` in one batch, then ``decode_tokens`` greedy tokens one at a time."""
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    def greedy() -> int:
        return int(np.argmax(last_logits(llm)))

    llm.eval(prompt)  # warm-up: the first run pages the weights in and starts the threads
    for _ in range(4):
        llm.eval([greedy()])
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    token = greedy()
    prefill = time.perf_counter() - started
    tokens = [token]
    started = time.perf_counter()
    for _ in range(decode_tokens):
        llm.eval([token])
        token = greedy()
        tokens.append(token)
    decode = time.perf_counter() - started
    llm.close()
    return Speed(len(prompt) / prefill, decode_tokens / decode, tokens)


def run_twin(runner, prompt: list[int], decode_tokens: int) -> Speed:  # type: ignore[no-untyped-def]
    from npu.llm.params import GenerationParams

    runner.warm_up()
    cache = runner.stack.new_cache()
    started = time.perf_counter()
    steps = runner.generate_step(prompt, GenerationParams(max_tokens=decode_tokens, temperature=0.0), cache)
    step = next(steps)
    while step.token is None:
        step = next(steps)
    prefill = time.perf_counter() - started
    tokens = [step.token]
    started = time.perf_counter()
    for _ in range(decode_tokens):
        tokens.append(next(steps).token)
    decode = time.perf_counter() - started
    steps.close()
    return Speed(len(prompt) / prefill, decode_tokens / decode, tokens)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def median_speed(runs: list[Speed]) -> Speed:
    """Median prefill and decode of several runs (the tokens of the first)."""
    return Speed(statistics.median(r.prefill_tps for r in runs),
                 statistics.median(r.decode_tps for r in runs), runs[0].tokens)


def main(models_dir: Path, bits: int | None, prompt_tokens: int, decode_tokens: int,
         threads: int | None, rounds: int = 3) -> int:
    """The twin and llama.cpp in turn, ``rounds`` times (a shared machine's load moves between runs),
    then their medians; each round's figures and the load average as it ended are printed too."""
    from appliance.demo_model import find_demo_gguf
    from npu.llm.runner import LLMRunner
    from npu.runtime.onnx_backend import default_threads
    from scripts.bench.llm import current_demo_bundle, prompt_of

    label = f"{bits or 32}-bit"
    threads = threads or default_threads()
    bundle = current_demo_bundle(models_dir, bits)
    gguf = find_demo_gguf()
    assert gguf is not None
    runner = LLMRunner.load(bundle, backend="onnx", threads=threads)
    prompt = runner.encode_chat(prompt_of(runner, prompt_tokens, "Compare."))
    llama_cpp = import_llama_cpp()
    if llama_cpp is None or not runs_here(gguf):
        twin = run_twin(runner, prompt, decode_tokens)
        print(f"llama.cpp: {PACKAGE} could not be installed or run here, so there is no comparison; "
              f"twin {label}: prefill {twin.prefill_tps:.1f} tok/s, decode {twin.decode_tps:.1f} tok/s")
        return 1
    n_ctx = len(prompt) + decode_tokens + 16
    twins, refs, loads = [], [], []
    for _ in range(max(1, rounds)):
        twins.append(run_twin(runner, prompt, decode_tokens))
        refs.append(run_llama_cpp(llama_cpp, gguf, prompt, decode_tokens, threads, n_ctx=n_ctx))
        loads.append(os.getloadavg()[0])
    runner.close()
    twin, ref = median_speed(twins), median_speed(refs)
    print(f"model: {gguf.name} (twin bundle {bundle.name}, {label}); prompt {len(prompt)} tokens, "
          f"{decode_tokens} decode tokens, greedy, {threads} threads; "
          f"llama-cpp-python {llama_cpp.__version__}; {len(twins)} rounds, medians")
    print("| runner | prefill tok/s | decode tok/s |")
    print("|---|---|---|")
    print(f"| twin (ONNX Runtime, {label}) | {twin.prefill_tps:.1f} | {twin.decode_tps:.1f} |")
    print(f"| llama.cpp ({gguf.suffixes[-2].lstrip('.')}) | {ref.prefill_tps:.1f} | {ref.decode_tps:.1f} |")
    for i, (t, r, load) in enumerate(zip(twins, refs, loads, strict=True)):
        print(f"round {i + 1}: decode twin {t.decode_tps:.1f}, llama.cpp {r.decode_tps:.1f} tok/s "
              f"(ratio {t.decode_tps / r.decode_tps:.2f}); prefill twin {t.prefill_tps:.1f}, "
              f"llama.cpp {r.prefill_tps:.1f} tok/s; load average {load:.2f}")
    same = min(agreeing_prefix(t.tokens, r.tokens) for t in twins for r in refs)
    print(f"greedy tokens identical to llama.cpp's: the first {same} of {len(twin.tokens)}")
    print(f"twin/llama.cpp prefill ratio: {twin.prefill_tps / ref.prefill_tps:.2f}")
    print(f"twin/llama.cpp decode ratio: {twin.decode_tps / ref.decode_tps:.2f} "
          f"(twin {twin.decode_tps:.1f} tok/s, llama.cpp {ref.decode_tps:.1f} tok/s, {label})")
    return 0
