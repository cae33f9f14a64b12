"""Time to first token and end-to-end latency through the HTTP bridge, against the engine called directly.

The bridge runs in this process on loopback, over one engine with the demo model. Every engine
job is timed at its sink (submission, first text, last event), so the bridge's own cost is the
client's wall time minus the engine's time for the same job: that difference, per request, is
the overhead (JSON parsing, tokenization hop, asyncio hand-off, SSE framing, TCP on loopback).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from appliance.demo_model import ensure_demo_model  # noqa: E402
from bridge_http.app import create_app  # noqa: E402
from bridge_http.server import HttpServer  # noqa: E402
from npu.engine.api import ChatRequest, Delta, Done, Failed, JobEvent, Sink  # noqa: E402
from npu.engine.engine import Engine, EngineConfig  # noqa: E402
from npu.engine.worker import ModelSpec  # noqa: E402
from npu.llm.params import GenerationParams  # noqa: E402

PROMPT = "Describe, in two sentences, a gallery room where the walls glow when visitors speak."


class TimedEngine:
    """Wraps ``engine.submit`` so each job's sink records when things happened (perf_counter)."""

    def __init__(self, engine: Engine) -> None:
        self.records: dict[str, dict[str, float]] = {}
        self._submit = engine.submit
        engine.submit = self.submit  # type: ignore[method-assign]

    def submit(self, request: ChatRequest, sink: Sink):  # type: ignore[no-untyped-def]
        record = {"submit": time.perf_counter()}
        self.records[request.request_id or ""] = record

        def timed(event: JobEvent) -> None:
            now = time.perf_counter()
            if isinstance(event, Delta) and "first" not in record:
                record["first"] = now
            if isinstance(event, Done | Failed):
                record["done"] = now
            sink(event)

        return self._submit(request, timed)


def direct(engine: Engine, max_tokens: int) -> tuple[float, float]:
    """(TTFT, end-to-end) in ms with the engine called in-process, no HTTP."""
    marks: dict[str, float] = {}

    def sink(event: JobEvent) -> None:
        now = time.perf_counter()
        if isinstance(event, Delta):
            marks.setdefault("first", now)
        if isinstance(event, Done | Failed):
            marks["done"] = now

    params = GenerationParams(max_tokens=max_tokens, temperature=0)
    request = ChatRequest(messages=[{"role": "user", "content": PROMPT}], params=params)
    start = time.perf_counter()
    engine.submit(request, sink).wait(120)
    return (marks["first"] - start) * 1e3, (marks["done"] - start) * 1e3


def streamed(client: httpx.Client, url: str, timed: TimedEngine, max_tokens: int) -> dict[str, float]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
                            "temperature": 0, "stream": True}
    start = time.perf_counter()
    first = None
    cid = ""
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            cid = chunk["id"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    rec = timed.records[cid]
    assert first is not None
    return {
        "ttft": (first - start) * 1e3,
        "e2e": (end - start) * 1e3,
        "ttft_overhead": (first - start) * 1e3 - (rec["first"] - rec["submit"]) * 1e3,
        "e2e_overhead": (end - start) * 1e3 - (rec["done"] - rec["submit"]) * 1e3,
    }


def whole(client: httpx.Client, url: str, timed: TimedEngine) -> float:
    """The overhead of one non-streamed, one-token answer."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    start = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json=body)
    end = time.perf_counter()
    rec = timed.records[r.json()["id"]]
    return (end - start) * 1e3 - (rec["done"] - rec["submit"]) * 1e3


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="full answers per path")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100, help="one-token requests for the overhead")
    args = parser.parse_args()
    bundle = ensure_demo_model(ROOT / "models")
    engine = Engine([ModelSpec("demo", "chat", bundle, runtime="onnx")], config=EngineConfig(max_active=1))
    engine.start(timeout=120)
    timed = TimedEngine(engine)
    server = HttpServer(create_app(engine), "127.0.0.1", 0)
    server.start()
    url = f"http://127.0.0.1:{server.bound_port}"
    try:
        with httpx.Client(timeout=120) as client:
            for _ in range(3):  # warm-up: first runs pay for allocation and caches
                whole(client, url, timed)
                streamed(client, url, timed, 4)
                direct(engine, 4)
            direct_runs = []
            http_runs = []
            for _ in range(args.runs):
                direct_runs.append(direct(engine, args.max_tokens))
                http_runs.append(streamed(client, url, timed, args.max_tokens))
            small = [whole(client, url, timed) for _ in range(args.requests)]
    finally:
        server.stop()
        engine.stop()
    med = statistics.median
    print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
          f"python {platform.python_version()}")
    print(f"prompt {PROMPT!r}, max_tokens {args.max_tokens}, temperature 0, {args.runs} runs per path")
    print("| figure | engine direct | through HTTP (SSE) |")
    print("|---|---|---|")
    print(f"| time to first token, median | {med([d[0] for d in direct_runs]):.1f} ms "
          f"| {med([h['ttft'] for h in http_runs]):.1f} ms |")
    print(f"| end to end, median | {med([d[1] for d in direct_runs]):.1f} ms "
          f"| {med([h['e2e'] for h in http_runs]):.1f} ms |")
    print()
    print("| bridge overhead (client time minus the engine's time for the same job) | median | p99 |")
    print("|---|---|---|")
    for name, values in (("streamed, to the first token", [h["ttft_overhead"] for h in http_runs]),
                         ("streamed, to [DONE]", [h["e2e_overhead"] for h in http_runs]),
                         (f"one-token answer, not streamed ({args.requests} requests)", small)):
        print(f"| {name} | {med(values):.2f} ms | {pct(values, 0.99):.2f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
