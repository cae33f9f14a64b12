"""One worker thread per NPU device: it owns that device's resident models and runs jobs.

Jobs advance one step at a time (a prefill chunk, a decode token, the text encoder, a UNet step,
the VAE), round-robin over the active jobs, so a long prompt or an image does not freeze another
job's stream. Cancellation and the request timeout are checked between steps; each is answered
with a typed error and frees the job's KV cache slot at once. ``step_started`` lets the watchdog
see a step that hangs; a device fault hands the worker's jobs to the recovery
(``npu.engine.recovery``), which replaces the worker.
The thermal level throttles (one job at a time, a pause between rounds) or holds the worker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Literal, Protocol

from npu.device.base import DeviceFault, DeviceMonitor
from npu.device.cmm_plan import bundle_mib
from npu.device.thermal import ThermalLevel
from npu.diffusion.image_encode import ImageTooLarge
from npu.diffusion.params import DecodedImage, ImageStep
from npu.diffusion.pipeline import DiffusionPipeline, ImageRequestError, encode_decoded
from npu.engine.api import (
    ChatRequest,
    ChatResult,
    Delta,
    Done,
    EngineError,
    ErrorCode,
    Failed,
    ImageProgress,
    ImageRequest,
    ImageResult,
    JobEvent,
    JobHandle,
    Progress,
)
from npu.engine.config import EngineConfig, ModelSpec
from npu.engine.job import WorkerJob, expiry_error
from npu.engine.metrics import EngineMetrics
from npu.llm.kv_cache import CacheMemoryError
from npu.llm.runner import LLMRunner
from npu.runtime.memory import release_freed_memory

logger = logging.getLogger(__name__)

WorkerState = Literal["loading", "ready", "reloading", "recovering", "failed"]
__all__ = ["DeviceWorker", "ModelSpec", "Runner", "RunnerLoader", "WorkerHost", "load_runner"]


Runner = LLMRunner | DiffusionPipeline
RunnerLoader = Callable[[ModelSpec, int, int], Runner]


def load_runner(spec: ModelSpec, device_id: int, cache_slots: int) -> Runner:
    if spec.kind == "image":
        return DiffusionPipeline.load(spec.path, backend=spec.runtime, device_id=device_id)
    return LLMRunner.load(spec.path, backend=spec.runtime, device_id=device_id, cache_slots=cache_slots)


class WorkerHost(Protocol):
    """What a worker needs of the engine that runs it: jobs to take, and where their ends go."""

    @property
    def config(self) -> EngineConfig: ...
    @property
    def metrics(self) -> EngineMetrics: ...
    @property
    def stopping(self) -> bool: ...

    def next_job(self, worker: DeviceWorker, block: bool, timeout: float = 0.5) -> WorkerJob | None: ...
    def answer(self, job: WorkerJob, event: Done | Failed) -> None: ...
    def record_duration(self, seconds: float) -> None: ...
    def encode_later(self, work: Callable[[], None]) -> None: ...
    def device_fault(self, worker: DeviceWorker, reason: str) -> None: ...
    def notify_state(self, force: bool = False) -> None: ...


class DeviceWorker(threading.Thread):
    def __init__(
        self,
        device_id: int,
        models: list[ModelSpec],
        engine: WorkerHost,
        *,
        loader: RunnerLoader | None = None,
        max_active: int = 2,
        monitor: DeviceMonitor | None = None,
    ) -> None:
        super().__init__(name=f"engine-dev{device_id}", daemon=True)
        self.device_id = device_id
        self.specs = list(models)
        self.engine = engine
        self.loader = loader or load_runner
        self.max_active = max_active
        self.monitor = monitor
        self.thermal = ThermalLevel.NORMAL
        self.step_started: float | None = None  # monotonic start of the step running now
        self.abandoned = False  # replaced after a fault: never touch jobs or the engine again
        self.runners: dict[str, Runner] = {}
        self.loaded = threading.Event()
        self.state: WorkerState = "loading"
        self.reason: str | None = None
        self._active: list[WorkerJob] = []
        self._active_lock = threading.Lock()
        self._reload: tuple[str | None, threading.Event] | None = None

    # status, read from other threads ---------------------------------------------------------
    @property
    def accepting(self) -> bool:
        limit = 1 if self.thermal >= ThermalLevel.THROTTLE else self.max_active
        return (
            self.state == "ready" and not self.abandoned and self._reload is None
            and self.thermal < ThermalLevel.PAUSE and len(self._active) < limit
        )

    def take_jobs(self) -> list[WorkerJob]:
        """Abandon this worker and hand over its running jobs (the recovery requeues them)."""
        self.abandoned = True
        with self._active_lock:
            jobs, self._active = self._active, []
        for job in jobs:
            job.stream = None  # the generator may be stuck in the hung thread: never resume it
        return jobs

    def cancel(self, request_id: str) -> int:
        with self._active_lock:
            jobs = [j for j in self._active if j.handle.request.request_id == request_id]
        for job in jobs:
            job.handle.cancel()
        return len(jobs)

    def request_reload(self, model_id: str | None) -> threading.Event:
        done = threading.Event()
        self._reload = (model_id, done)
        return done

    # the thread ------------------------------------------------------------------------------
    def run(self) -> None:
        self._load([s for s in self.specs if s.preload])
        self.loaded.set()
        engine = self.engine
        while not engine.stopping and not self.abandoned:
            if self._reload is not None and not self._active:
                self._do_reload()
            while self.accepting:
                job = engine.next_job(self, block=not self._active)
                if job is None:
                    break
                self._start(job)
            if not self._active or self.thermal >= ThermalLevel.PAUSE:
                if not self.accepting:
                    time.sleep(0.05)
                continue
            for job in list(self._active):
                if self.abandoned:
                    return
                self._step(job)
            if self.thermal >= ThermalLevel.THROTTLE:
                time.sleep(engine.config.throttle_delay)  # cool-down between rounds of steps
        if self.abandoned:
            return
        for job in list(self._active):
            self._fail(job, EngineError(ErrorCode.UNAVAILABLE, "the appliance is stopping; retry later"))

    def _load(self, specs: list[ModelSpec]) -> None:
        for spec in specs:
            started = time.monotonic()
            try:
                self._check_cmm(spec)
                runner = self.loader(spec, self.device_id, self.max_active)
                warm_up = getattr(runner, "warm_up", None)  # test doubles may have none
                if warm_up is not None:
                    warm_up()
                self.runners[spec.id] = runner
            except Exception as exc:
                self.reason = f"model {spec.id} failed to load: {exc}"
                logger.error("device %d: %s", self.device_id, self.reason)
                continue
            logger.info("device %d: %s loaded in %.1f s", self.device_id, spec.id, time.monotonic() - started)
        self.state = "ready"
        self.engine.notify_state()

    def _check_cmm(self, spec: ModelSpec) -> None:
        """Refuse a load the card's memory (CMM) cannot hold, instead of failing half-way."""
        if self.monitor is None:
            return
        free = self.monitor.read(self.device_id).cmm_free_mib
        if free is None:
            return
        need = bundle_mib(spec.path)
        if need > free:
            raise MemoryError(f"not enough CMM on device {self.device_id}: {free:.0f} MiB free, "
                              f"the model needs about {need:.0f} MiB")

    def _do_reload(self) -> None:
        assert self._reload is not None
        model_id, done = self._reload
        self.state = "reloading"
        self.engine.notify_state()
        specs = [s for s in self.specs if model_id is None or s.id == model_id]
        self.close_runners([s.id for s in specs])  # the old models leave the card before the new load
        self.reason = None
        self._load(specs)
        self._reload = None
        done.set()

    def close_runners(self, model_ids: list[str] | None = None) -> None:
        """Unload these models (all by default) from the device, each on its own, and forget them.

        Dropping a runner is not enough on the card: its sessions and buffers stay allocated
        until closed (PyAXEngine keeps its sessions until exit; pyaxcl buffers are the appliance's).
        """
        for model_id in list(self.runners) if model_ids is None else model_ids:
            runner = self.runners.pop(model_id, None)
            if runner is None:
                continue
            try:
                runner.close()
            except Exception:
                logger.exception("device %d: closing %s failed", self.device_id, model_id)
        release_freed_memory()

    def _start(self, job: WorkerJob) -> None:
        handle = job.handle
        now = time.monotonic()
        if handle.cancelled:
            self._finish(job, Failed(EngineError(ErrorCode.CANCELLED, "cancelled before it started")))
            return
        expired = expiry_error(job, self.engine.config.request_timeout, now)
        if expired is not None:
            self._finish(job, Failed(expired))
            return
        runner = self.runners.get(job.model_id)
        if runner is None:
            error = EngineError(ErrorCode.UNAVAILABLE, f"model {job.model_id} is not loaded")
            self._finish(job, Failed(error))
            return
        job.started = now
        request = handle.request
        if isinstance(request, ImageRequest):
            assert isinstance(runner, DiffusionPipeline)
            job.stream = runner.generate_steps(request.params)
        else:
            assert isinstance(runner, LLMRunner) and isinstance(request, ChatRequest)
            job.stream = runner.stream_generate(job.prompt_ids, request.params)
        handle.status = "running"
        with self._active_lock:
            self._active.append(job)

    def _step(self, job: WorkerJob) -> None:
        handle = job.handle
        if handle.cancelled:
            self._fail(job, EngineError(ErrorCode.CANCELLED, "cancelled"))
            return
        timeout = self.engine.config.request_timeout
        if time.monotonic() - job.started > timeout:
            self._fail(job, EngineError(ErrorCode.TIMEOUT, f"generation took longer than {timeout:g} s"))
            return
        assert job.stream is not None
        started = self.step_started = time.monotonic()
        try:
            if self.monitor is not None:
                self.monitor.before_step(self.device_id)
            resp = next(job.stream)
        except Exception as exc:
            self.step_started = None  # a failed step is over: the watchdog must not count it as hung
            if not self.abandoned:  # else the recovery owns the job (and closed the sessions under it)
                self._step_failed(job, exc)
            return
        self.step_started = None
        if self.abandoned:
            return  # the step came back after the recovery took its job over
        now = time.monotonic()
        self._warn_slow_step(now - started)
        if isinstance(resp, ImageStep):
            self._image_step(job, resp, now)
            return
        if resp.usage.completion_tokens > job.tokens_counted:
            self._count_tokens(job, resp.usage.completion_tokens, now)
        text = resp.text
        if job.resume and text:
            n = min(len(text), len(job.resume))
            if text[:n] != job.resume[:n]:
                message = "the device was reset and the answer did not repeat identically; it was stopped"
                self._fail(job, EngineError(ErrorCode.DEVICE_RESET, message))
                return
            job.resume, text = job.resume[n:], text[n:]
        if text:
            job.parts.append(text)
            self._emit(handle, Delta(text, resp.token))
        elif resp.token is None and resp.finish_reason is None:
            self._emit(handle, Progress(resp.prompt_done, resp.usage.prompt_tokens))
        if resp.finish_reason is not None:
            result = ChatResult(
                text="".join(job.parts),
                model=job.model_id,
                finish_reason=resp.finish_reason,
                usage=resp.usage,
                prompt_ms=resp.prompt_ms,
                generation_ms=resp.generation_ms,
                total_ms=(time.monotonic() - handle.submitted) * 1e3,
                queued_ms=(job.started - handle.submitted) * 1e3,
            )
            self._remove(job)
            self.engine.record_duration(now - job.started)
            self._finish(job, Done(result))

    def _step_failed(self, job: WorkerJob, exc: Exception) -> None:
        if isinstance(exc, DeviceFault):
            logger.error("device %d: %s", self.device_id, exc)
            self.abandoned = True  # this thread steps nothing more; the recovery takes over
            self.engine.device_fault(self, str(exc))
        elif isinstance(exc, EngineError):
            self._fail(job, exc)
        elif isinstance(exc, CacheMemoryError):  # the card cannot hold one more conversation now
            self._fail(job, EngineError(ErrorCode.BUSY, str(exc)))
        elif isinstance(exc, ImageRequestError):
            self._fail(job, EngineError(ErrorCode.BAD_REQUEST, str(exc)))
        elif isinstance(exc, StopIteration):
            self._fail(job, EngineError(ErrorCode.INTERNAL, "generation ended without a result"))
        else:
            logger.error("device %d: job %s failed", self.device_id, job.handle.id, exc_info=exc)
            self._fail(job, EngineError(ErrorCode.INTERNAL, f"generation failed: {exc}"))

    def _warn_slow_step(self, elapsed: float) -> None:
        if elapsed > self.engine.config.step_timeout:
            logger.warning("device %d: a step took %.1f s (watchdog %.1f s)", self.device_id, elapsed,
                           self.engine.config.step_timeout)

    def _image_step(self, job: WorkerJob, step: ImageStep, now: float) -> None:
        """Progress, or (the picture decoded) its encoding handed to the engine's encoder thread:
        the device takes the next job's step meanwhile."""
        if step.decoded is None:
            self._emit(job.handle, ImageProgress(step.stage, step.step, step.steps))
            return
        decoded = step.decoded
        self.engine.encode_later(lambda: self._encode_and_finish(job, decoded))
        self._remove(job)

    def _encode_and_finish(self, job: WorkerJob, decoded: DecodedImage) -> None:
        handle = job.handle
        request = handle.request
        assert isinstance(request, ImageRequest)
        try:
            output = encode_decoded(decoded, request.params)
        except ImageTooLarge as exc:
            self._finish(job, Failed(EngineError(ErrorCode.BAD_REQUEST, str(exc))))
            return
        except Exception as exc:
            logger.exception("encoding the image of job %s failed", handle.id)
            self._finish(job, Failed(EngineError(ErrorCode.INTERNAL, f"encoding the image failed: {exc}")))
            return
        now = time.monotonic()
        self.engine.record_duration(now - job.started)
        self._finish(job, Done(ImageResult(output=output, model=job.model_id,
                                           total_ms=(now - handle.submitted) * 1e3,
                                           queued_ms=(job.started - handle.submitted) * 1e3)))

    def _count_tokens(self, job: WorkerJob, total: int, now: float) -> None:
        """Feed the latency histograms and the token counter as the job's usage grows."""
        metrics = self.engine.metrics.for_model(job.model_id)
        if job.last_token_at is None:
            metrics.ttft.observe(now - job.handle.submitted)
            metrics.queue_time.observe(job.started - job.handle.submitted)
        else:
            metrics.itl.observe(now - job.last_token_at)
        metrics.generation_tokens.inc(total - job.tokens_counted)
        job.tokens_counted = total
        job.last_token_at = now

    def _emit(self, handle: JobHandle, event: JobEvent) -> None:
        if self.abandoned:
            return
        try:
            handle.sink(event)
        except Exception:
            logger.exception("sink of job %s failed", handle.id)

    def _remove(self, job: WorkerJob) -> None:
        with self._active_lock:
            if job in self._active:
                self._active.remove(job)

    def _fail(self, job: WorkerJob, error: EngineError) -> None:
        if job.stream is not None:
            close = getattr(job.stream, "close", None)
            if close is not None:
                close()  # releases the KV cache slot
        self._remove(job)
        self._finish(job, Failed(error))

    def _finish(self, job: WorkerJob, event: Done | Failed) -> None:
        self.engine.answer(job, event)
