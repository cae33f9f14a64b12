"""Time from a hung step to the first answered request after recovery, with the simulated card.

The engine runs the demo model with the sim monitor. A job streams, the card is told to hang its
next step, and a second request waits in the queue. The watchdog is driven at the health job's
default pace (every 2 s) with the default step limit; the figure is the time from the hang to the
first answer after the recovery, split into its parts (detection, reset, model reload, answers).
"""

from __future__ import annotations

import argparse
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
from npu.engine.api import ChatRequest, Delta, Done, Failed, JobEvent  # noqa: E402
from npu.engine.engine import Engine, EngineConfig  # noqa: E402
from npu.engine.recovery import RecoveryConfig  # noqa: E402
from npu.engine.worker import ModelSpec  # noqa: E402
from npu.llm.params import GenerationParams  # noqa: E402


class Timeline:
    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.lock = threading.Lock()

    def mark(self, name: str) -> None:
        with self.lock:
            self.marks.setdefault(name, time.perf_counter())


def one_run(engine: Engine, sim: SimMonitor, timeline: Timeline, health_interval: float) -> dict[str, float]:
    first_text = threading.Event()

    def running_sink(event: JobEvent) -> None:
        if isinstance(event, Delta):
            first_text.set()
        if isinstance(event, Done | Failed):
            timeline.mark("running_answered")

    def waiting_sink(event: JobEvent) -> None:
        if isinstance(event, Done | Failed):
            timeline.mark("waiting_answered")

    params = GenerationParams(max_tokens=24, temperature=0)
    ask = [{"role": "user", "content": "Describe a quiet gallery at night."}]
    running = engine.submit(ChatRequest(messages=ask, params=params), running_sink)
    waiting = engine.submit(ChatRequest(messages=[{"role": "user", "content": "Hi"}],
                                        params=GenerationParams(max_tokens=4, temperature=0)), waiting_sink)
    first_text.wait(60)
    sim.set(0, fault="hang")
    hang_at = time.perf_counter()
    while not (running.wait(0) and waiting.wait(0)):
        engine.check_watchdog()
        time.sleep(health_interval)
    m = timeline.marks
    first = min(m["running_answered"], m["waiting_answered"])
    return {
        "detected": m["device_hung"] - hang_at,
        "reset": m["models_reloaded"] - m["device_reset"],
        "hang_to_first_answer": first - hang_at,
        "hang_to_all_answered": max(m["running_answered"], m["waiting_answered"]) - hang_at,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--step-timeout", type=float, default=30.0, help="engine.step_timeout (default)")
    parser.add_argument("--health-interval", type=float, default=2.0, help="device.health_interval")
    args = parser.parse_args()
    bundle = ensure_demo_model(ROOT / "models")
    sim = SimMonitor(reset_seconds=0.5)
    engine = Engine([ModelSpec("demo", "chat", bundle, runtime="onnx")],
                    config=EngineConfig(max_active=1, step_timeout=args.step_timeout),
                    monitor=sim, recovery=RecoveryConfig())
    engine.start(timeout=120)
    timelines: list[Timeline] = []
    engine.add_event_listener(lambda name, fields: timelines[-1].mark(name))
    runs = []
    try:
        for _ in range(args.runs):
            timelines.append(Timeline())
            runs.append(one_run(engine, sim, timelines[-1], args.health_interval))
    finally:
        engine.stop()
    med = statistics.median
    print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
          f"python {platform.python_version()}")
    print(f"step_timeout {args.step_timeout:g} s, health every {args.health_interval:g} s, sim reset 0.5 s, "
          f"{args.runs} runs")
    print("| figure | median | worst |")
    print("|---|---|---|")
    for key, label in (("detected", "hang detected (watchdog)"),
                       ("reset", "reset and model reload"),
                       ("hang_to_first_answer", "hang to the first answered request"),
                       ("hang_to_all_answered", "hang to both requests answered")):
        values = [r[key] for r in runs]
        print(f"| {label} | {med(values):.2f} s | {max(values):.2f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
