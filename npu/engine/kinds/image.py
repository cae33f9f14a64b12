"""Text to image: checked against the pipeline on admission, one step per text encoder, UNet step
and VAE, the picture encoded on the host while the device runs the next job."""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator
from typing import Any

from npu.diffusion.image_encode import ImageTooLarge
from npu.diffusion.params import DecodedImage, ImageStep
from npu.diffusion.pipeline import DiffusionPipeline, ImageRequestError, encode_decoded
from npu.diffusion.preview import preview_jpeg
from npu.engine.api import (
    Done,
    EngineError,
    ErrorCode,
    Failed,
    ImagePreview,
    ImageProgress,
    ImageRequest,
    ImageResult,
    JobEvent,
)
from npu.engine.config import ModelSpec
from npu.engine.eta import Work
from npu.engine.job import WorkerJob
from npu.engine.kinds import ModelFacts, StepOutcome
from npu.engine.metrics import EngineMetrics

logger = logging.getLogger(__name__)

NO_IMAGE_MODEL = (
    "no image model is installed here; on the device, 'scripts/fetch_models sd15-lcm' installs "
    "Stable Diffusion 1.5 LCM and adds it to appliance.yaml (docs/INSTALL.md)"
)


class ImageKind:
    name = "image"
    request_type = ImageRequest

    def load(self, spec: ModelSpec, device_id: int, cache_slots: int) -> DiffusionPipeline:
        return DiffusionPipeline.load(spec.path, backend=spec.runtime, device_id=device_id)

    def facts(self, runner: Any) -> ModelFacts:
        return ModelFacts(sizes=getattr(runner, "sizes", None),
                          steps=getattr(runner, "supported_steps", None))

    def model_not_found(self, requested: str | None, available: list[str]) -> EngineError:
        message = (f"no image model {requested!r} here; available: {', '.join(available)}" if available
                   else NO_IMAGE_MODEL)
        return EngineError(ErrorCode.MODEL_NOT_FOUND, message)

    def admit(self, request: ImageRequest, runner: Any) -> tuple[ImageRequest, None]:
        if request.params.seed is None:  # drawn here, so a retried job makes the same image
            request = dataclasses.replace(
                request, params=dataclasses.replace(request.params, seed=secrets.randbits(31))
            )
        assert isinstance(runner, DiffusionPipeline)
        try:
            runner.check(request.params)
        except ImageRequestError as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        return request, None

    def steps(self, job: WorkerJob, runner: Any) -> Iterator[ImageStep]:
        request = job.handle.request
        assert isinstance(runner, DiffusionPipeline) and isinstance(request, ImageRequest)
        return runner.generate_steps(request.params)

    def advance(self, job: WorkerJob, step: ImageStep, now: float, metrics: EngineMetrics) -> StepOutcome:
        if step.decoded is None:
            events: tuple[JobEvent, ...] = (ImageProgress(step.stage, step.step, step.steps),)
            request = job.handle.request
            assert isinstance(request, ImageRequest)
            if request.preview and step.stage == "unet" and step.latents is not None:
                events += (ImagePreview(preview_jpeg(step.latents, request.preview), step.step, step.steps),)
            return StepOutcome(events=events)
        decoded = step.decoded
        return StepOutcome(later=lambda: encode(job, decoded))

    def failure(self, exc: Exception) -> EngineError | None:
        if isinstance(exc, ImageRequestError):
            return EngineError(ErrorCode.BAD_REQUEST, str(exc))
        return None

    def retry(self, job: WorkerJob) -> None:
        """Nothing to keep: the drawn seed makes the same picture again."""

    def record(self, metrics: EngineMetrics, model_id: str, done: Done) -> None:
        metrics.for_model(model_id).e2e.observe(done.result.total_ms / 1e3)
        metrics.success.labels(model_id, "image").inc()

    # waiting times (npu.engine.eta): the phases are the pipeline's stages
    def eta_phase(self, job: WorkerJob, step: ImageStep) -> str:
        return step.stage

    def eta_work(self, job: WorkerJob) -> dict[str, Work]:
        return {phase: Work(units) for phase, units in self.eta_units(job, None).items()}

    def eta_units(self, job: WorkerJob, result: object) -> dict[str, float]:
        request = job.handle.request
        assert isinstance(request, ImageRequest)
        passes = 2 if request.params.guidance_scale > 1.0 else 1  # guided: the UNet runs twice a step
        return {"text": passes, "unet": request.params.steps * passes, "vae": 1}

    def eta_progress(self, job: WorkerJob) -> tuple[int, int | None]:
        request = job.handle.request
        assert isinstance(request, ImageRequest)
        return int(job.spent.get("unet", [0.0, 0.0])[1]), request.params.steps


def encode(job: WorkerJob, decoded: DecodedImage) -> Done | Failed:
    """The picture as PNG or JPEG within its byte limit: host work, on the engine's encoder thread."""
    handle = job.handle
    request = handle.request
    assert isinstance(request, ImageRequest)
    try:
        output = encode_decoded(decoded, request.params)
    except ImageTooLarge as exc:
        return Failed(EngineError(ErrorCode.BAD_REQUEST, str(exc)))
    except Exception as exc:
        logger.exception("encoding the image of job %s failed", handle.id)
        return Failed(EngineError(ErrorCode.INTERNAL, f"encoding the image failed: {exc}"))
    now = time.monotonic()
    return Done(ImageResult(output=output, model=job.model_id, total_ms=(now - handle.submitted) * 1e3,
                            queued_ms=(job.started - handle.submitted) * 1e3))


KIND = ImageKind()
