"""Bus traffic of the two card paths, counted on the simulated card (``bench_llm --sim-card``).

For each model shape, the same prefill and decode run through the PyAXEngine path (every input
copied up and every output down on each run) and through the resident path on pyaxcl's engine
API (``npu/llm/resident_stack.py``). The simulated card (``tests/fake_axengine.py``,
``tests/fake_axcl_engine.py``) counts each byte and call that crosses its bus, by direction.
``demo`` is the demo model converted and declared as AXERA compiles it (bf16, 2047 rows); the
Qwen shapes are declared only (their numbers are zeros): bytes and calls do not depend on
weights.
"""

from __future__ import annotations

import ctypes
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fake_axcl_engine  # noqa: E402
import fake_axengine  # noqa: E402

from npu.llm.layer_stack import LayerStack  # noqa: E402
from npu.llm.model_args import ModelArgs  # noqa: E402
from npu.runtime import axcl_backend  # noqa: E402

# Hugging Face config.json numbers of the models AXERA publishes for the card.
SHAPES = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "num_hidden_layers": 24, "hidden_size": 896,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "head_dim": 64,
                     "vocab_size": 151936, "intermediate_size": 4864},
    "qwen3-1.7b": {"model_type": "qwen3", "num_hidden_layers": 28, "hidden_size": 2048,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "vocab_size": 151936, "intermediate_size": 6144},
}
CONTEXT = {"qwen2.5-0.5b": 1023, "qwen3-1.7b": 1023}  # kv_cache_len of AXERA's builds
PROMPT_TOKENS = 300  # three prefill chunks
DECODE_TOKENS = 16


def bundles(workdir: Path, models_dir: Path) -> dict[str, Path]:
    from appliance.demo_model import ensure_demo_model

    demo = fake_axengine.Layout(decode=(2047,), placeholder="hidden")
    out = {"demo": fake_axengine.make_npu_bundle(ensure_demo_model(models_dir), workdir / "demo", demo)}
    for name, config in SHAPES.items():
        layout = fake_axengine.Layout(decode=(CONTEXT[name],), placeholder="hidden")
        prefix = config["model_type"]
        out[name] = fake_axengine.make_shape_bundle(workdir / name, config, layout, prefix=prefix)
    return out


def install(backend: str) -> fake_axengine.Record:
    """The simulated card with the face this backend talks to; its bus counter."""
    record = fake_axengine.Record()
    if backend == "axengine":
        sys.modules["axengine"] = fake_axengine.make_module(record)
    else:
        sys.modules["axcl"] = fake_axcl_engine.make_axcl(record=record)
        axcl_backend.reset_runtime()
    return record


def per_step(record: fake_axengine.Record, run, layers: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    before = record.snapshot()
    steps = run()
    after = record.snapshot()
    diff = {k: (after.get(k, 0) - before.get(k, 0)) / steps for k in after}
    calls = sum(v for k, v in diff.items() if not k.endswith("_bytes")) - layers
    return {"h2d": diff.get("h2d_bytes", 0), "d2h": diff.get("d2h_bytes", 0),
            "d2d": diff.get("d2d_bytes", 0), "calls": calls}


def host_us(stack, cache, rng, hidden: int) -> float:  # type: ignore[no-untyped-def]
    """The appliance's own Python per decode token, with every card call answered at once."""
    rt = sys.modules["axcl"].rt  # type: ignore[attr-defined]
    saved = rt.engine_execute, rt.memcpy
    rt.engine_execute = rt.memcpy = lambda *a: 0
    try:
        embed = rng.standard_normal(hidden)
        start = time.perf_counter()
        for t in range(DECODE_TOKENS):
            stack.logits(stack.decode(cache, t, embed))
        return (time.perf_counter() - start) / DECODE_TOKENS * 1e6
    finally:
        rt.engine_execute, rt.memcpy = saved


def ctypes_call_us() -> float:
    """One call made the way pyaxcl makes them: restype and argtypes set, then the C call."""
    libc = ctypes.CDLL(None)
    count = 20000
    start = time.perf_counter()
    for _ in range(count):
        libc.labs.restype = ctypes.c_int32
        libc.labs.argtypes = [ctypes.c_long]
        libc.labs(ctypes.c_long(-1))
    return (time.perf_counter() - start) / count * 1e6


def measure(bundle: Path, backend: str) -> dict[str, dict[str, float]]:
    record = install(backend)
    args = ModelArgs.load(bundle)
    stack = LayerStack.load(bundle, args, backend)
    rng = np.random.default_rng(0)
    cache = stack.new_cache()
    chunk = stack.chunk
    ids = list(range(PROMPT_TOKENS))

    def prefill() -> int:
        hidden = None
        while cache.offset < len(ids):
            part = ids[cache.offset : cache.offset + chunk]
            hidden = stack.prefill_chunk(cache, part, rng.standard_normal((len(part), args.hidden_size)))
        stack.logits(hidden)  # type: ignore[arg-type]
        return -(-len(ids) // chunk)

    def decode() -> int:
        for t in range(1, DECODE_TOKENS + 1):
            stack.logits(stack.decode(cache, t, rng.standard_normal(args.hidden_size)))
        return DECODE_TOKENS

    prefill()  # bind every IO once (a conversation's first steps), then measure the steady state
    stack.logits(stack.decode(cache, 0, rng.standard_normal(args.hidden_size)))
    cache.trim(0)
    result = {"prefill": per_step(record, prefill, args.num_hidden_layers),
              "decode": per_step(record, decode, args.num_hidden_layers)}
    if backend == "axcl":
        result["host_us"] = {"us": host_us(stack, cache, rng, args.hidden_size)}
    stack.free_cache(cache)
    stack.close()
    if backend == "axcl":
        result["leaks"] = sys.modules["axcl"].leaks()  # type: ignore[attr-defined]
    return result


def main(models_dir: Path) -> int:
    print(f"machine: {platform.machine()}, python {platform.python_version()}; simulated card; "
          f"prompt {PROMPT_TOKENS} tokens, {DECODE_TOKENS} decode tokens")
    print("| shape | path | step | host→device B | device→host B | device→device B | "
          "calls beyond layer runs |")
    print("|---|---|---|---|---|---|---|")
    lines = []
    with tempfile.TemporaryDirectory(prefix="sim-card-") as tmp:
        for shape, bundle in bundles(Path(tmp), models_dir).items():
            rows = {b: measure(bundle, b) for b in ("axengine", "axcl")}
            for backend, label in (("axengine", "PyAXEngine"), ("axcl", "resident (pyaxcl)")):
                for step in ("prefill", "decode"):
                    r = rows[backend][step]
                    unit = "chunk" if step == "prefill" else "token"
                    print(f"| {shape} | {label} | per {unit} | {r['h2d']:,.0f} | {r['d2h']:,.0f} | "
                          f"{r['d2d']:,.0f} | {r['calls']:.0f} |")
            print(f"| {shape} | resident (pyaxcl) | host Python per token, card calls answered at once | "
                  f"{rows['axcl']['host_us']['us']:.0f} µs | | | |")
            leaks = rows["axcl"].get("leaks", {})
            if any(leaks.values()):
                print(f"LEAK {shape}: {json.dumps(leaks)}", file=sys.stderr)
                return 1
            resident, old = rows["axcl"]["decode"], rows["axengine"]["decode"]
            lines.append(
                f"resident-kv {shape}: {resident['h2d'] + resident['d2h']:.0f} B/token host-device "
                f"(PyAXEngine path {old['h2d'] + old['d2h']:.0f} B/token), "
                f"{resident['calls']:.0f} calls/token"
            )
    print(f"\none pyaxcl-style ctypes call (restype, argtypes, call): {ctypes_call_us():.2f} µs")
    print()
    print("\n".join(lines))
    return 0
