"""How soon an open console hears a state change: from the engine's change to the event in each stream.

The bridge runs in this process on loopback, over one engine with the demo model, and N clients
hold ``GET /console/events`` open (as N console tabs would). Each round pauses or resumes the
engine and measures, per client, the time from the call to the state event arriving in its
stream (SSE parsing on the client included). Figures per N: median, 95th percentile and worst.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.demo_model import ensure_demo_model  # noqa: E402
from bridge_http.app import create_app  # noqa: E402
from bridge_http.server import HttpServer  # noqa: E402
from npu.engine.engine import Engine, EngineConfig  # noqa: E402
from npu.engine.worker import ModelSpec  # noqa: E402


class Watcher(threading.Thread):
    """One console stream: remembers when each state arrived (perf_counter)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.seen: list[tuple[str, float]] = []
        self.ready = threading.Event()
        self.cond = threading.Condition()
        self.stop = False

    def run(self) -> None:
        with httpx.stream("GET", self.url, timeout=None) as response:
            event = ""
            for line in response.iter_lines():
                if self.stop:
                    return
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "state":
                    state = json.loads(line[6:])["state"]
                    with self.cond:
                        self.seen.append((state, time.perf_counter()))
                        self.cond.notify_all()
                elif line.startswith("data: ") and event == "queue":
                    self.ready.set()  # the snapshot's last event: the stream is live

    def wait_for(self, state: str, after: int, timeout: float = 10.0) -> float:
        with self.cond:
            assert self.cond.wait_for(lambda: any(s == state for s, _ in self.seen[after:]), timeout)
            return next(t for s, t in self.seen[after:] if s == state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    bundle = ensure_demo_model(ROOT / "models")
    engine = Engine([ModelSpec("demo", "chat", bundle, runtime="onnx")], config=EngineConfig(max_active=1))
    engine.start(timeout=120)
    server = HttpServer(create_app(engine), "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.bound_port}/console/events"
    print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}; "
          f"python {platform.python_version()}")
    print("clients  median ms  p95 ms  worst ms  (engine.pause()/resume() -> state event in every stream)")
    try:
        for count in args.clients:
            watchers = [Watcher(url) for _ in range(count)]
            for w in watchers:
                w.start()
            for w in watchers:
                assert w.ready.wait(30), "a stream did not open"
            delays: list[float] = []
            for i in range(args.rounds):
                target = "paused" if i % 2 == 0 else "idle"
                marks = [len(w.seen) for w in watchers]
                started = time.perf_counter()
                if target == "paused":
                    engine.pause("bench")
                else:
                    engine.resume()
                delays += [(w.wait_for(target, mark) - started) * 1e3 for w, mark in zip(watchers, marks,
                                                                                          strict=True)]
                time.sleep(0.05)
            delays.sort()
            p95 = delays[int(0.95 * (len(delays) - 1))]
            print(f"{count:7d}  {statistics.median(delays):9.1f}  {p95:6.1f}  {delays[-1]:8.1f}")
            for w in watchers:
                w.stop = True
            engine.resume()
    finally:
        server.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
