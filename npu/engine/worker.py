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
from npu.engine.api import Done, EngineError, ErrorCode, Failed, JobEvent, JobHandle, Priority
from npu.engine.config import EngineConfig, ModelSpec
from npu.engine.job import WorkerJob, expiry_error
from npu.engine.kinds import Runner, StepOutcome, all_kinds
from npu.engine.metrics import EngineMetrics
from npu.runtime.memory import release_freed_memory

logger = logging.getLogger(__name__)

WorkerState = Literal["loading", "ready", "reloading", "recovering", "failed"]
__all__ = ["DeviceWorker", "ModelSpec", "Runner", "RunnerLoader", "WorkerHost", "load_runner"]


RunnerLoader = Callable[[ModelSpec, int, int], Runner]


def load_runner(spec: ModelSpec, device_id: int, cache_slots: int) -> Runner:
    """Load a model the way its kind does (``npu.engine.kinds``)."""
    return all_kinds()[spec.kind].load(spec, device_id, cache_slots)


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
    def job_progress(self, job: WorkerJob, step: object, seconds: float) -> None: ...
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
        self._unload_only = False  # the pending reload only unloads its model (a scene frees the card)

    # status, read from other threads ---------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._has_room(0)

    @property
    def accepting_audio(self) -> bool:
        """Room for one speech job (``Priority.AUDIO``) past ``max_active``, so an utterance starts
        between the steps of the answers already running instead of waiting for one to end."""
        audio = sum(1 for job in self._active if job.handle.request.priority == Priority.AUDIO)
        return audio == 0 and self._has_room(1)

    def _has_room(self, extra: int) -> bool:
        limit = (1 if self.thermal >= ThermalLevel.THROTTLE else self.max_active) + extra
        return (
            self.state == "ready" and not self.abandoned and self._reload is None
            and self.thermal < ThermalLevel.PAUSE and len(self._active) < limit
        )

    def active_jobs(self) -> list[WorkerJob]:
        """The jobs this worker is stepping now (a snapshot)."""
        with self._active_lock:
            return list(self._active)

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

    def request_reload(self, model_id: str | None, *, unload: bool = False) -> threading.Event:
        """Reload these models (all: None) once no job runs; ``unload`` only takes one off the card."""
        done = threading.Event()
        self._unload_only = unload
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
            while self.accepting or self.accepting_audio:
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
        if self._unload_only:
            self.state = "ready"
            self.engine.notify_state()
        else:
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
        job.stream = job.kind.steps(job, runner)
        handle.status = "running"
        with self._active_lock:
            self._active.append(job)
        self.engine.job_progress(job, None, 0.0)  # its place: running

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
        self.engine.job_progress(job, resp, now - started)  # timed for the waiting-time figures
        self._apply(job, job.kind.advance(job, resp, now, self.engine.metrics), now)

    def _apply(self, job: WorkerJob, outcome: StepOutcome, now: float) -> None:
        """Send a step's events; end the job when the step ended it, now or after host work."""
        for event in outcome.events:
            self._emit(job.handle, event)
        later = outcome.later
        if isinstance(outcome.end, Failed):
            self._fail(job, outcome.end.error)
        elif outcome.end is not None:
            self._remove(job)
            self.engine.record_duration(now - job.started)
            self._finish(job, outcome.end)
        elif later is not None:
            self._remove(job)
            self.engine.encode_later(lambda: self._finish_later(job, later))

    def _finish_later(self, job: WorkerJob, work: Callable[[], Done | Failed]) -> None:
        event = work()
        if isinstance(event, Done):
            self.engine.record_duration(time.monotonic() - job.started)
        self._finish(job, event)

    def _step_failed(self, job: WorkerJob, exc: Exception) -> None:
        if isinstance(exc, DeviceFault):
            logger.error("device %d: %s", self.device_id, exc)
            self.abandoned = True  # this thread steps nothing more; the recovery takes over
            self.engine.device_fault(self, str(exc))
        elif isinstance(exc, EngineError):
            self._fail(job, exc)
        elif (known := job.kind.failure(exc)) is not None:
            self._fail(job, known)
        elif isinstance(exc, StopIteration):
            self._fail(job, EngineError(ErrorCode.INTERNAL, "generation ended without a result"))
        else:
            logger.error("device %d: job %s failed", self.device_id, job.handle.id, exc_info=exc)
            self._fail(job, EngineError(ErrorCode.INTERNAL, f"generation failed: {exc}"))

    def _warn_slow_step(self, elapsed: float) -> None:
        if elapsed > self.engine.config.step_timeout:
            logger.warning("device %d: a step took %.1f s (watchdog %.1f s)", self.device_id, elapsed,
                           self.engine.config.step_timeout)

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
