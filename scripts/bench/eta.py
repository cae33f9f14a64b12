"""How good the waiting times are: each job's predicted wait against what happened, over a mixed run.

An engine with the demo chat model and an image model (a random-weight 512x512 bundle in AXERA's
layout unless ``--bundle``) gets bursts of mixed requests: chats with different prompts and
``max_tokens``, and pictures. For every job the first ``Place`` it hears (``queued`` with
``eta_s``, or ``running`` at once) is compared with when it really started, and the ``eta_s`` of
its first ``running`` place with when it really ended. The figures are the median and 90th
percentile of the absolute errors, with the median wait for scale; a warm-up burst first lets
each model finish a job (before that ``eta_s`` is None, and such jobs are counted apart).
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from appliance.demo_model import ensure_demo_model  # noqa: E402
from npu.diffusion.params import ImageParams  # noqa: E402
from npu.engine.api import ChatRequest, Done, Failed, ImageRequest, JobEvent, Place, Request  # noqa: E402
from npu.engine.engine import Engine, EngineConfig  # noqa: E402
from npu.engine.worker import ModelSpec  # noqa: E402
from npu.llm.params import GenerationParams  # noqa: E402

PROMPTS = ["Name a colour.", "Describe the sea at night in two sentences.",
           "Tell a story about a lighthouse keeper.", "What is a haiku? Write one about rain.",
           "List three animals that live in the forest and say one thing about each."]


@dataclass
class Seen:
    kind: str
    submitted: float
    first_eta: float | None = None  # seconds to start, from the first place
    started: float | None = None
    end_eta: float | None = None  # seconds to end, from the first running place
    ended: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


def sink_for(seen: Seen):  # type: ignore[no-untyped-def]
    def sink(event: JobEvent) -> None:
        now = time.monotonic()
        if isinstance(event, Place):
            if seen.first_eta is None and seen.started is None:
                seen.first_eta = 0.0 if event.state == "running" else event.eta_s
                if event.state == "queued" and event.eta_s is None:
                    seen.first_eta = -1.0  # no figures yet
            if event.state == "running" and seen.started is None:
                seen.started, seen.end_eta = now, event.eta_s
        elif isinstance(event, Done | Failed):
            seen.ended = now
            seen.done.set()
    return sink


def mixed(rng: random.Random, images: bool) -> tuple[str, Request]:
    if images and rng.random() < 0.3:
        return "image", ImageRequest(ImageParams(prompt="a lighthouse in a storm", seed=rng.randrange(1000)))
    params = GenerationParams(max_tokens=rng.choice([8, 24, 48, 96]), temperature=0.7,
                              seed=rng.randrange(1000))
    return "chat", ChatRequest(messages=[{"role": "user", "content": rng.choice(PROMPTS)}], params=params)


def burst(engine: Engine, rng: random.Random, count: int, images: bool) -> list[Seen]:
    seen = []
    for _ in range(count):
        kind, request = mixed(rng, images)
        item = Seen(kind, time.monotonic())
        engine.submit(request, sink_for(item))
        seen.append(item)
        time.sleep(rng.uniform(0.0, 0.3))
    for item in seen:
        item.done.wait(600)
    return seen


def report(name: str, errors: list[float], waits: list[float]) -> None:
    if not errors:
        print(f"  {name:<28} no samples")
        return
    errors.sort()
    p90 = errors[min(len(errors) - 1, int(len(errors) * 0.9))]
    print(f"  {name:<28} median |error| {statistics.median(errors):6.2f} s, p90 {p90:6.2f} s "
          f"(median actual {statistics.median(waits):6.2f} s, {len(errors)} jobs)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=None,
                        help="an sd1.5-lcm bundle (default: random weights)")
    parser.add_argument("--bursts", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=10, help="requests per burst")
    parser.add_argument("--max-active", type=int, default=2)
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from sd_factory import build_sd_bundle

            bundle = build_sd_bundle(Path(tmp) / "sd15-random-512", latent=64)
        chat = ensure_demo_model(ROOT / "models")
        print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
              f"python {platform.python_version()}; max_active {args.max_active}")
        specs = [ModelSpec("chat", "chat", chat), ModelSpec("sd", "image", bundle)]
        engine = Engine(specs, config=EngineConfig(max_active=args.max_active, queue_max=64))
        engine.start(timeout=300)
        try:
            warm = burst(engine, rng, 4, images=True)
            runs = [burst(engine, rng, args.jobs, images=True) for _ in range(args.bursts)]
            figures = engine.queue().figures
        finally:
            engine.stop()
    unknown = sum(1 for s in warm if s.first_eta == -1.0)
    print(f"\n{args.bursts} bursts of {args.jobs} mixed requests (about 30% pictures), after a warm-up of 4 "
          f"({unknown} of them had no figures yet):")
    for kinds, label in ((("chat", "image"), "all"), (("chat",), "chat"), (("image",), "image")):
        start_err, start_wait, end_err, end_wait = [], [], [], []
        for item in (s for run in runs for s in run if s.kind in kinds):
            if item.started is None or item.ended is None:
                continue
            if item.first_eta is not None and item.first_eta >= 0:
                start_err.append(abs(item.first_eta - (item.started - item.submitted)))
                start_wait.append(item.started - item.submitted)
            if item.end_eta is not None:
                end_err.append(abs(item.end_eta - (item.ended - item.started)))
                end_wait.append(item.ended - item.started)
        report(f"{label}: wait to start", start_err, start_wait)
        report(f"{label}: time to end", end_err, end_wait)
    print("\nmeasured figures (seconds per unit):")
    for model, phases in figures.items():
        shown = ", ".join(f"{phase} {f['seconds_per_unit'] * 1e3:.1f} ms" for phase, f in phases.items())
        print(f"  {model:<6} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
