"""Time to first token of a persona: cold, warm, and the first answer after a card recovery.

The engine runs the demo model (CPU twin) with the simulated card and one persona whose system
prompt (the coyote of tests/test_personas.py, 296 tokens) is kept warm. Figures, each the
median of ``--runs``: a prompt with the same system prompt that is not kept (cold, every row
prefilled), a warm turn of the persona, and the persona's first answer after ``restart`` (the
card rebooted, the model loaded again, the prefix rebuilt at the load). TTFT is from submission
to the first text, as ``appliance_time_to_first_token_seconds`` counts it.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.demo_model import ensure_demo_model  # noqa: E402
from npu.device.sim import SimMonitor  # noqa: E402
from npu.engine.api import ChatRequest, Delta, Done, Failed, JobEvent, Persona  # noqa: E402
from npu.engine.engine import Engine, EngineConfig  # noqa: E402
from npu.engine.recovery import RecoveryConfig  # noqa: E402
from npu.engine.worker import ModelSpec  # noqa: E402
from npu.llm.params import GenerationParams  # noqa: E402

COYOTE = (ROOT / "examples/personas/coyote.txt").read_text().strip()  # a system prompt of 256+ tokens
QUESTION = "I just came in from the north door. What should I look at first, and why?"
PARAMS = GenerationParams(max_tokens=4, temperature=0.0)


def ttft(engine: Engine, system: str, question: str) -> tuple[float, int]:
    first = threading.Event()
    done: list[Done | Failed] = []
    stamp: list[float] = []

    def sink(event: JobEvent) -> None:
        if isinstance(event, Delta) and not first.is_set():
            stamp.append(time.perf_counter())
            first.set()
        if isinstance(event, Done | Failed):
            done.append(event)

    messages = Persona("p", system).messages([{"role": "user", "content": question}])
    started = time.perf_counter()
    handle = engine.submit(ChatRequest(model="demo", messages=messages, params=PARAMS), sink)
    handle.wait(120)
    result = done[0]
    if not isinstance(result, Done):
        raise SystemExit(f"the request failed: {result.error}")
    return stamp[0] - started, result.result.usage.cached_tokens  # type: ignore[union-attr]


def wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 300
    while engine.state().state != "idle" and time.monotonic() < deadline:
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    bundle = ensure_demo_model(ROOT / "models")
    sim = SimMonitor(reset_seconds=0.05)
    engine = Engine([ModelSpec("demo", "chat", bundle, runtime="onnx", prefixes=(COYOTE,))],
                    config=EngineConfig(max_active=1), monitor=sim,
                    recovery=RecoveryConfig(attempts=2, backoff=0.1))
    engine.start(timeout=300)
    cold, warm, after = [], [], []
    cached: dict[str, int] = {}
    try:
        for i in range(args.runs):
            engine.restart("bench")
            wait_idle(engine)
            seconds, cached["after a recovery"] = ttft(engine, COYOTE, f"{QUESTION} ({i})")
            after.append(seconds)
            seconds, cached["warm turn"] = ttft(engine, COYOTE, f"{QUESTION} [{i}]")
            warm.append(seconds)
            other = COYOTE.replace("Coyote", f"Raven{i}")  # the same length, never kept
            seconds, cached["cold"] = ttft(engine, other, QUESTION)
            cold.append(seconds)
    finally:
        engine.stop()
        sim.close()
    print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print(f"demo model (CPU twin), system prompt kept warm, max_tokens 4, {args.runs} runs")
    print("| time to first token | median | worst | prompt rows reused |")
    print("|---|---|---|---|")
    rows = (("cold (same length, not kept)", "cold", cold), ("warm turn", "warm turn", warm),
            ("first answer after a recovery", "after a recovery", after))
    for label, key, values in rows:
        print(f"| {label} | {statistics.median(values) * 1e3:.0f} ms | {max(values) * 1e3:.0f} ms | "
              f"{cached[key]} |")


if __name__ == "__main__":
    main()
