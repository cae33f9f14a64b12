"""Image figures: per-stage timings of the SD 1.5 LCM pipeline, the cost of a step preview, and chat
speed while images are made (with and without previews).

Without ``--bundle`` a random-weight bundle in AXERA's layout is built (the test suite's factory)
at the real model's 512x512 size: its graphs are tiny, so the figures show the pipeline's own
cost around the models (tokenizer, scheduler, host copies, PNG/JPEG encoding) and the engine's
interleaving, not Stable Diffusion's compute. On the Pi, ``--bundle models/sd15-lcm`` times the
real thing on the card.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from appliance.demo_model import ensure_demo_model  # noqa: E402
from npu.diffusion.params import ImageParams  # noqa: E402
from npu.diffusion.pipeline import DiffusionPipeline, encode_decoded  # noqa: E402
from npu.diffusion.preview import preview_jpeg  # noqa: E402
from npu.engine.api import ChatRequest, Done, Failed, ImageRequest, JobEvent  # noqa: E402
from npu.engine.engine import Engine, EngineConfig  # noqa: E402
from npu.engine.worker import ModelSpec  # noqa: E402
from npu.llm.params import GenerationParams  # noqa: E402

PROMPT = "a peaceful mountain lake at sunrise, pine trees, reflection in the water"
STORY = [{"role": "user", "content": "Tell a long story about a lighthouse keeper and the sea."}]


def stages(pipeline: DiffusionPipeline, runs: int, fmt: str) -> None:
    rows: dict[str, list[float]] = {"text encoder": [], "unet step": [], "vae": [], "encode": [], "total": []}
    size = 0
    for i in range(runs + 1):
        started = time.perf_counter()
        params = ImageParams(prompt=PROMPT, seed=i, format=fmt, max_bytes=64 << 20)  # type: ignore[arg-type]
        *_, last = pipeline.generate_steps(params)
        assert last.decoded is not None
        output = encode_decoded(last.decoded, params)
        total = (time.perf_counter() - started) * 1e3
        if i == 0:
            continue  # warm-up
        t = output.timings
        rows["text encoder"].append(t.text_ms)
        rows["unet step"].extend(t.unet_ms)
        rows["vae"].append(t.vae_ms)
        rows["encode"].append(t.encode_ms)
        rows["total"].append(total)
        size = len(output.data)
    print(f"\nper stage, {pipeline.width}x{pipeline.height}, 4 steps, {fmt} ({size} bytes), "
          f"median of {runs}:")
    for name, values in rows.items():
        print(f"  {name:<13} {statistics.median(values):8.2f} ms")


def preview_cost(pipeline: DiffusionPipeline, runs: int, size: int) -> None:
    """What a step preview adds to a UNet step: the 4x3 projection, the resize and the JPEG."""
    costs: list[float] = []
    unet: list[float] = []
    nbytes = 0
    for i in range(runs + 1):
        for step in pipeline.generate_steps(ImageParams(prompt=PROMPT, seed=i)):
            if step.latents is None:
                continue
            started = time.perf_counter()
            data = preview_jpeg(step.latents, size)
            if i:  # the first run warms up
                costs.append((time.perf_counter() - started) * 1e3)
                nbytes = len(data)
        if i and step.decoded is not None:
            unet.extend(step.decoded.timings.unet_ms)
    per_step, cost = statistics.median(unet), statistics.median(costs)
    p90 = sorted(costs)[int(len(costs) * 0.9)]
    print(f"\npreview ({size} px JPEG, {nbytes} bytes) after each UNet step, median of {len(costs)}:")
    print(f"  preview          {cost:8.2f} ms  (p90 {p90:.2f} ms)")
    print(f"  unet step        {per_step:8.2f} ms  (the preview adds {cost / per_step:.1%})")

def chat_speed(engine: Engine, max_tokens: int) -> float:
    done: list[Done] = []
    request = ChatRequest(messages=STORY, params=GenerationParams(max_tokens=max_tokens, temperature=0))
    handle = engine.submit(request, lambda e: done.append(e) if isinstance(e, Done) else None)
    handle.wait(300)
    result = done[0].result
    return result.usage.completion_tokens / (result.generation_ms / 1e3)  # type: ignore[union-attr]


def chat_with_images(engine: Engine, max_tokens: int, preview: int | None = None) -> tuple[float, int]:
    """Chat tokens/s while images are submitted back to back; returns (tok/s, images made)."""
    stop = threading.Event()
    made = [0]

    def images() -> None:
        while not stop.is_set():
            finished = threading.Event()

            def sink(event: JobEvent, finished: threading.Event = finished) -> None:
                if isinstance(event, Done):
                    made[0] += 1
                if isinstance(event, Done | Failed):
                    finished.set()

            engine.submit(ImageRequest(ImageParams(prompt=PROMPT, seed=made[0]), preview=preview), sink)
            finished.wait(300)

    thread = threading.Thread(target=images, daemon=True)
    thread.start()
    time.sleep(0.2)
    speed = chat_speed(engine, max_tokens)
    stop.set()
    thread.join(300)
    return speed, made[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, default=None,
                        help="an sd1.5-lcm bundle (default: a random-weight one, built)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--preview-size", type=int, default=256, help="step previews' size, pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from sd_factory import build_sd_bundle

            bundle = build_sd_bundle(Path(tmp) / "sd15-random-512", latent=64)
        print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, "
              f"python {platform.python_version()}; bundle {bundle}")
        pipeline = DiffusionPipeline.load(bundle)
        for fmt in ("png", "jpeg"):
            stages(pipeline, args.runs, fmt)
        preview_cost(pipeline, args.runs, args.preview_size)
        del pipeline
        chat = ensure_demo_model(ROOT / "models")
        specs = [ModelSpec("chat", "chat", chat), ModelSpec("sd", "image", bundle)]
        engine = Engine(specs, config=EngineConfig(max_active=2))
        engine.start(timeout=300)
        try:
            chat_speed(engine, 16)  # warm-up
            alone = statistics.median(chat_speed(engine, args.max_tokens) for _ in range(3))
            shared = [chat_with_images(engine, args.max_tokens) for _ in range(3)]
            previewed = [chat_with_images(engine, args.max_tokens, args.preview_size) for _ in range(3)]
        finally:
            engine.stop()
        with_images = statistics.median(s for s, _ in shared)
        print(f"\nchat ({args.max_tokens} tokens, demo model, greedy), median of 3:")
        print(f"  alone               {alone:7.1f} tokens/s")
        print(f"  while images run    {with_images:7.1f} tokens/s "
              f"({with_images / alone:.0%}; {sum(n for _, n in shared)} images made meanwhile)")
        with_previews = statistics.median(s for s, _ in previewed)
        print(f"  images + previews   {with_previews:7.1f} tokens/s "
              f"({with_previews / alone:.0%}; {sum(n for _, n in previewed)} images made meanwhile)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
