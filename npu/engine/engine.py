"""The resident engine: models kept loaded, a bounded job queue, one worker per device.

Both front doors submit here. ``submit`` validates and tokenizes on the caller's thread, so a bad
request is refused at once with a typed error; accepted jobs wait in a bounded priority queue and
are run by the device workers step by step (see ``npu.engine.worker``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from npu.device.base import DeviceMonitor, DeviceReading
from npu.device.thermal import ThermalLevel
from npu.engine.api import (
    DeviceSnapshot,
    Done,
    EngineError,
    EngineState,
    ErrorCode,
    EventListener,
    Failed,
    JobHandle,
    JobInfo,
    ModelInfo,
    Persona,
    Priority,
    Request,
    Sink,
    StateListener,
    persona_missing,
)
from npu.engine.config import EngineConfig, ModelSpec, RecoveryConfig
from npu.engine.events import Listeners
from npu.engine.job import WorkerJob
from npu.engine.kinds import ModelFacts, Runner, all_kinds, kind_for_request
from npu.engine.metrics import EngineMetrics
from npu.engine.places import Places, Plan, QueueInfo
from npu.engine.queue import JobQueue, request_sender
from npu.engine.recovery import Recovery
from npu.engine.senders import SenderCounts, SenderGate
from npu.engine.worker import DeviceWorker, RunnerLoader

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

logger = logging.getLogger(__name__)

STOPPING = "the appliance is stopping; retry later"
__all__ = ["Engine", "EngineConfig", "ModelSpec", "RecoveryConfig"]


class Engine:
    """Owns the queue and the device workers; thread-safe."""

    def __init__(
        self,
        models: Sequence[ModelSpec],
        *,
        config: EngineConfig | None = None,
        device_ids: Sequence[int] = (0,),
        loader: RunnerLoader | None = None,
        monitor: DeviceMonitor | None = None,
        recovery: RecoveryConfig | None = None,
        personas: Sequence[Persona] = (),
    ) -> None:
        if not models:
            raise ValueError("the engine needs at least one model")
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique: {ids}")
        # Other names a model answers to (gpt-4o-mini): never another model's id or alias.
        self.aliases: dict[str, str] = {}
        for m in models:
            for alias in m.aliases:
                if alias in ids or alias in self.aliases:
                    raise ValueError(f"alias {alias!r} of {m.id} names another model too")
                self.aliases[alias] = m.id
        self._personas = {p.name: p for p in personas}
        self._active_personas: frozenset[str] | None = None  # the scene's; None: every persona
        self._default_persona: str | None = None  # the scene's persona for a request naming none
        self.config = config or EngineConfig()
        self.specs = {m.id: m for m in models}
        kinds = all_kinds()
        unknown = sorted({m.kind for m in models} - set(kinds))
        if unknown:
            raise ValueError(f"no job kind {unknown[0]!r}; known: {', '.join(sorted(kinds))}")
        # The model of each kind a request that names none runs on: the one marked, else the first.
        self.defaults: dict[str, str] = {}
        for name in dict.fromkeys(m.kind for m in models):
            of_kind = [m for m in models if m.kind == name]
            self.defaults[name] = next((m.id for m in of_kind if m.default), of_kind[0].id)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue = JobQueue()
        self._listeners = Listeners(self.state)
        self._recovering: set[int] = set()
        self._failed: dict[int, str] = {}
        self.stop_event = threading.Event()
        self._readings: dict[int, DeviceReading] = {}  # the health job's latest, for devices()
        self.models_list = list(models)
        self.loader = loader
        self.monitor = monitor
        self.recovery_config = recovery or RecoveryConfig()
        self._every_worker: list[DeviceWorker] = []  # replaced ones too: stop frees their models
        self._paused_reason: str | None = None
        self._stopping = False
        # Jobs a worker took from the queue that have not ended: what ``running`` counts. Taking a
        # job and counting it happen under one lock, so no moment shows it neither waiting nor running.
        self._taken = 0
        # ... and which worker took each: the waiting-time plan and ``queue()`` read this one list
        # under the same lock as ``state()``, so a job between its taking and its first step (or
        # after its last step, until answered) still holds its slot in every view.
        self._taken_by: dict[int, tuple[DeviceWorker, WorkerJob]] = {}
        self._durations: list[float] = []
        self.jobs_done = 0
        self.jobs_failed = 0
        self.metrics = EngineMetrics(lambda: len(self._queue), lambda: self._taken)
        self.places = Places()  # each job's place and wait, from measured figures (npu.engine.eta)
        self._senders = SenderGate(self.config.sender_limits, self.config.senders, self.metrics.registry,
                                   self._waiting_by_sender)
        self.workers = [self._new_worker(device_id) for device_id in device_ids]
        # PNG/JPEG encoding is host work: done here, the device runs the next step meanwhile. A job
        # being encoded was taken and has not ended, so the state still counts it as running.
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-encode")
        # Answers waiting jobs at their deadline even when no worker takes jobs (paused, too hot).
        self._expiry = threading.Thread(target=self._expire_waiting, name="engine-expiry", daemon=True)

    @property
    def default_chat(self) -> str | None:
        return self.defaults.get("chat")

    @property
    def default_image(self) -> str | None:
        return self.defaults.get("image")

    def encode_later(self, work: Callable[[], None]) -> None:
        """Run ``work`` (a job's image encoding and its final event) on the encoder thread."""
        try:
            self._encoder.submit(work)
        except RuntimeError:  # stopping, after a worker's join timed out: encode here, answer the job
            work()

    def _new_worker(self, device_id: int) -> DeviceWorker:
        worker = DeviceWorker(device_id, self.models_list, self, loader=self.loader,
                              max_active=self.config.max_active, monitor=self.monitor)
        self._every_worker.append(worker)
        return worker

    # lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait_loaded: bool = True, timeout: float | None = None) -> None:
        for worker in self.workers:
            worker.start()
        self._expiry.start()
        if wait_loaded:
            self.wait_loaded(timeout)
        self._notify_state()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until every device's worker has loaded its models (or failed to); False when
        ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker in list(self.workers):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not worker.loaded.wait(left):
                return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; jobs still waiting are answered ``unavailable``, never dropped."""
        self.stop_event.set()
        with self._work:
            self._stopping = True
            waiting = self._queue.take_all()
            self._work.notify_all()
        for job in waiting:
            self.answer(job, Failed(EngineError(ErrorCode.UNAVAILABLE, STOPPING)))
        for worker in self.workers:
            worker.join(timeout)
        if self._expiry.is_alive():
            self._expiry.join(timeout)
        self._encoder.shutdown(wait=True)  # pictures being encoded are still delivered
        for worker in self._every_worker:
            if not worker.is_alive():  # a thread stuck in a hung call keeps what it holds
                worker.close_runners()  # the models' sessions and caches, on the card or the CPU
        self._notify_state()

    # front-door API --------------------------------------------------------------------------
    def submit(self, request: Request, sink: Sink) -> JobHandle:
        """Validate, tokenize and queue a job, or raise ``EngineError`` at once."""
        try:
            if self._failed and len(self._failed) == len(self.workers):
                raise EngineError(ErrorCode.UNAVAILABLE, self._failed_message())
            return self._admit(request, sink)
        except EngineError as exc:
            self.metrics.rejected.labels(exc.code.value).inc()
            with self._lock:
                self._senders.rejected(request_sender(request), exc.code.value)
            raise

    def _admit(self, request: Request, sink: Sink) -> JobHandle:
        kind = kind_for_request(request)
        if kind is None:
            raise EngineError(ErrorCode.BAD_REQUEST, f"no job kind runs a {type(request).__name__}")
        model_id = request.model or self.defaults.get(kind.name)
        spec = self.specs.get(self.aliases.get(model_id or "", model_id or ""))
        if spec is None and request.model in self._personas:  # a persona the scene leaves out
            raise persona_missing(request.model, [p.name for p in self.personas()])
        if spec is None or spec.kind != kind.name:
            available = [m for m, s in self.specs.items() if s.kind == kind.name]
            raise kind.model_not_found(request.model, available)
        priority = self._senders.limits_of(request_sender(request)).priority
        if priority is not None:
            request = dataclasses.replace(request, priority=Priority(priority))
        request, state = kind.admit(request, self._any_runner(spec.id))
        job = WorkerJob(handle=JobHandle(request, sink), model_id=spec.id, kind=kind, state=state)
        return self._enqueue(job)

    def _enqueue(self, job: WorkerJob) -> JobHandle:
        handle = job.handle
        handle.on_cancel = self._drop_queued
        with self._work:
            if self._stopping:
                raise EngineError(ErrorCode.UNAVAILABLE, STOPPING, retry_after=5)
            if len(self._queue) >= self.config.queue_max:
                raise EngineError(
                    ErrorCode.BUSY,
                    f"the queue is full ({self.config.queue_max} waiting); retry later",
                    retry_after=self._retry_after_locked(),
                )
            sender = request_sender(handle.request)
            self._senders.check(sender, self._queue.waiting_of(sender), self._retry_after_locked())
            self._senders.accepted(sender)
            self._queue.push(job)
            self._work.notify_all()
        self._notify_state()
        return handle

    def cancel(self, request_id: str) -> int:
        """Cancel every queued or running job submitted with this request id."""
        count = 0
        with self._work:
            queued = [job.handle for job in self._queue.jobs() if job.handle.request.request_id == request_id]
        for handle in queued:
            handle.cancel()
        count += len(queued)
        for worker in self.workers:
            count += worker.cancel(request_id)
        return count

    def _drop_queued(self, handle: JobHandle) -> None:
        """A waiting job that is cancelled frees its place in the queue at once."""
        with self._work:
            job = self._queue.remove(handle)
        if job is None:
            return  # already taken by a worker, which will stop it at its next step
        self.answer(job, Failed(EngineError(ErrorCode.CANCELLED, "cancelled while waiting")))

    def _expire_waiting(self) -> None:
        """The expiry thread: sleep until the next waiting job's limit, answer every job past it."""
        limit = self.config.request_timeout
        while True:
            with self._work:
                if self._stopping:
                    return
                now = time.monotonic()
                expired = self._queue.take_expired(limit, now)
                if not expired:
                    first = self._queue.next_expiry(limit)
                    self._work.wait(min((now + 5.0 if first is None else first) - now, 5.0))
                    continue
            for job, error in expired:
                self.answer(job, Failed(error))

    def pause(self, reason: str = "paused by request") -> None:
        with self._work:
            changed, self._paused_reason = self._paused_reason != reason, reason
        self._notify_state()
        if changed:
            self.emit_event("paused", reason=reason)  # the event log says who paused it and why

    def resume(self) -> None:
        with self._work:
            was, self._paused_reason = self._paused_reason, None
            self._work.notify_all()
        self._notify_state()
        if was is not None:
            self.emit_event("resumed")

    def loaded_models(self) -> set[str]:
        """The models every device holds now."""
        workers = list(self.workers)
        return {m for m in self.specs if all(m in w.runners for w in workers)}

    def load_model(self, model_id: str, timeout: float | None = None) -> None:
        """Load a model on every device that lacks it (a scene's); the card's CMM is checked first."""
        self.wait_loaded(timeout)  # at start-up, the preloaded models first
        if model_id not in self.loaded_models():
            self.reload(model_id, timeout)
            missing = [w.device_id for w in self.workers if model_id not in w.runners]
            if missing:
                reason = next((w.reason for w in self.workers if w.reason), "it did not load")
                raise EngineError(ErrorCode.UNAVAILABLE, f"model {model_id} could not be loaded: {reason}")

    def unload_model(self, model_id: str, timeout: float | None = None) -> None:
        """Take a model off every device once running jobs finish, freeing its memory (a scene's)."""
        self.wait_loaded(timeout)
        if any(model_id in w.runners for w in self.workers):
            self.reload(model_id, timeout, unload=True)

    def reload(self, model_id: str | None = None, timeout: float | None = None, *,
               unload: bool = False) -> None:
        """Reload resident models on every device once running jobs finish; queued jobs wait.

        Refused at once, saying what to do, when no worker would carry it out (a failed or
        recovering device, a stop): the caller would otherwise wait for ever.
        """
        if model_id is not None and model_id not in self.specs:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"no model {model_id!r} here")
        self._check_reloadable()
        done = [(worker, worker.request_reload(model_id, unload=unload)) for worker in list(self.workers)]
        with self._work:
            self._work.notify_all()
        self._notify_state()
        deadline = None if timeout is None else time.monotonic() + timeout
        for worker, event in done:
            while not event.wait(0.1):
                if worker.abandoned or not worker.is_alive() or self._stopping:
                    raise EngineError(ErrorCode.UNAVAILABLE, (
                        f"device {worker.device_id} stopped or was taken over by a recovery during the "
                        "reload; the state says what follows"), retry_after=5)
                if deadline is not None and time.monotonic() > deadline:
                    raise EngineError(ErrorCode.TIMEOUT, f"the reload did not finish within {timeout:g} s")
        self._notify_state()
        self.emit_event("unloaded" if unload else "reloaded", model=model_id)  # model None: every model

    def _check_reloadable(self) -> None:
        with self._lock:
            failed, recovering, stopping = dict(self._failed), sorted(self._recovering), self._stopping
        if stopping:
            raise EngineError(ErrorCode.UNAVAILABLE, STOPPING, retry_after=5)
        if failed:
            device, why = next(iter(failed.items()))
            raise EngineError(ErrorCode.UNAVAILABLE, (
                f"NPU device {device} has failed ({why}), so its models cannot be reloaded; send "
                "'restart' to reset the card and load the models again, and if that fails too, reseat "
                "the card or restart the host"))
        if recovering:
            raise EngineError(ErrorCode.UNAVAILABLE, (
                f"NPU device {recovering[0]} is being recovered, which reloads its models; retry once the "
                "state is idle"), retry_after=5)
        gone = [w.device_id for w in self.workers if w.abandoned or not w.is_alive()]
        if gone:
            raise EngineError(ErrorCode.UNAVAILABLE, (
                f"the worker of NPU device {gone[0]} is not running; send 'restart' to reset the card "
                "and load the models again"))

    def models(self) -> list[ModelInfo]:
        infos = []
        kinds = all_kinds()
        for spec in self.specs.values():
            runner = self.workers[0].runners.get(spec.id)
            facts = kinds[spec.kind].facts(runner) if runner is not None else ModelFacts()
            infos.append(ModelInfo(id=spec.id, kind=spec.kind, loaded=runner is not None,
                                   backend=runner.backend if runner else None,
                                   aliases=list(spec.aliases) or None, **dataclasses.asdict(facts)))
        return infos

    def personas(self) -> list[Persona]:
        """The personas requests may name now: those of the current scene (all, without scenes)."""
        active = self._active_personas
        return [p for p in self._personas.values() if active is None or p.name in active]

    def persona(self, name: str | None) -> Persona | None:
        """The persona of this name if requests may name it now; ``None`` asks for the scene's
        default persona (the one a request naming neither a persona nor a model gets), if any."""
        name = self._default_persona if name is None else name
        return next((p for p in self.personas() if p.name == name), None)

    def set_personas(self, names: Sequence[str] | None, default: str | None = None) -> None:
        """Limit requests to these personas (a scene's) and set its default; None allows every one."""
        unknown = sorted({*(names or ()), *([default] if default else [])} - set(self._personas))
        if unknown:
            raise ValueError(f"no persona {unknown[0]!r}; configured: {', '.join(self._personas)}")
        self._active_personas = None if names is None else frozenset(names)
        self._default_persona = default

    def senders(self) -> dict[str, dict[str, Any]]:
        """Each sender seen: jobs waiting now, requests accepted, refusals by code (for telemetry)."""
        with self._lock:
            waiting = self._queue.waiting_by_sender()
            counts: dict[str, SenderCounts] = dict(self._senders.counts)
            return {name: {"waiting": waiting.get(name, 0), "requests": c.requests,
                           "rate_limited": c.rejected.get(ErrorCode.RATE_LIMITED.value, 0),
                           "rejected": dict(c.rejected)}
                    for name, c in sorted(counts.items())}

    def jobs(self) -> list[JobInfo]:
        """The running jobs (every one a worker took and has not answered, as ``state()`` counts
        them), then the waiting ones in the order workers will take them."""
        with self._lock:
            waiting = self._queue.order()
            running = [job for _, job in self._taken_by.values()]
        now = time.monotonic()
        return ([self._job_info(job, "running", None, now) for job in running]
                + [self._job_info(job, "queued", i + 1, now) for i, job in enumerate(waiting)])

    @staticmethod
    def _job_info(job: WorkerJob, state: Literal["queued", "running"], position: int | None,
                  now: float) -> JobInfo:
        place = getattr(job, "place", None)  # the last place announced to the job, with its progress
        return JobInfo(id=job.handle.id, kind=job.kind.name, model=job.model_id,
                       sender=job.handle.request.sender, state=state, position=position,
                       waited_s=round(now - job.handle.submitted, 1),
                       step=getattr(place, "step", None) if state == "running" else None,
                       steps=getattr(place, "steps", None) if state == "running" else None,
                       eta_s=getattr(place, "eta_s", None))

    def _waiting_by_sender(self) -> dict[str, int]:
        with self._lock:
            return self._queue.waiting_by_sender()

    def state(self) -> EngineState:
        """The one snapshot of the engine that ``{base}/state``, ``/health``, telemetry and Home
        Assistant show: waiting and running jobs are counted under one lock hold."""
        with self._lock:
            depth = len(self._queue)
            running = self._taken
            paused = self._paused_reason
            stopping = self._stopping
        hot = [w for w in self.workers if w.thermal >= ThermalLevel.PAUSE]
        if stopping:
            name = "stopped"
        elif self._failed and len(self._failed) == len(self.workers):
            name = "failed"
        elif self._recovering or any(w.state == "reloading" for w in self.workers):
            name = "recovering"
        elif any(not w.loaded.is_set() for w in self.workers):
            name = "loading"
        elif paused is not None or len(hot) == len(self.workers):
            name = "paused"
        else:
            name = "busy" if running or depth else "idle"
        if name == "failed":
            reason: str | None = self._failed_message()
        elif name == "paused":
            reason = paused or f"too hot: device {hot[0].device_id} cools down before taking jobs again"
        else:
            reason = next((w.reason for w in self.workers if w.reason), None)
            if reason is None and self._failed:
                reason = self._failed_message()
        return EngineState(name, depth, running, self.config.queue_max, reason)  # type: ignore[arg-type]

    def _failed_message(self) -> str:
        device, why = next(iter(self._failed.items()))
        return (f"NPU device {device} failed and could not be recovered ({why}); the appliance keeps "
                "running: reseat the card or restart the host, then restart the appliance")

    def devices(self) -> list[DeviceSnapshot]:
        """Every device's thermal level, recovery, failure and latest reading, in device order."""
        with self._lock:
            recovering, failed, readings = set(self._recovering), dict(self._failed), dict(self._readings)
        return [
            DeviceSnapshot(device_id=w.device_id, thermal=w.thermal.label,
                           recovering=w.device_id in recovering, failed=failed.get(w.device_id),
                           loaded=w.loaded.is_set(), reading=readings.get(w.device_id))
            for w in list(self.workers)
        ]

    def record_reading(self, reading: DeviceReading) -> None:
        """The health job's latest reading of a device, shown by ``devices()``."""
        with self._lock:
            self._readings[reading.device_id] = reading

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry ``/metrics`` serves."""
        return self.metrics.registry

    def add_state_listener(self, listener: StateListener) -> None:
        self._listeners.add_state(listener)

    def queue(self) -> QueueInfo:
        """The queue's length and when a request sent now would start (``{base}/queue``, ``/v1/queue``)."""
        counts: list[int] = []
        info = self.places.info(self._plan(counts), self.config.queue_max)
        return dataclasses.replace(info, length=counts[0], running=counts[1])  # as ``state()`` counts

    def _plan(self, counts: list[int] | None = None) -> Plan:
        """The waiting jobs in the queue's service order, and each worker's slots and the jobs it
        took that have not been answered, read under the one lock ``state()`` counts them under
        (``counts`` gets that snapshot's queue depth and running jobs)."""
        with self._lock:
            waiting = self._queue.order()
            taken = list(self._taken_by.values())
            taking = self._paused_reason is None and not self._stopping
            if counts is not None:
                counts[:] = [len(self._queue), self._taken]
        devices = []
        for w in list(self.workers):
            if w.abandoned:
                continue
            slots = 1 if w.thermal >= ThermalLevel.THROTTLE else w.max_active
            if not taking or w.thermal >= ThermalLevel.PAUSE or not w.loaded.is_set():
                slots = 0  # it takes nothing now: every waiting job waits
            devices.append((slots, [job for worker, job in taken if worker is w]))
        return waiting, devices

    # called by workers -----------------------------------------------------------------------
    def job_progress(self, job: WorkerJob, step: object, seconds: float) -> None:
        """A worker started ``job`` (``step`` None) or ran one of its steps in ``seconds``."""
        if step is not None:
            self.places.step(job, step, seconds)
        self.places.announce(self._plan, urgent=step is None)

    def next_job(self, worker: DeviceWorker, block: bool, timeout: float = 0.5) -> WorkerJob | None:
        """The highest-priority waiting job this worker may take, waiting up to ``timeout``."""
        with self._work:
            if block and not self._ready_locked(worker):
                self._work.wait(timeout)
            if not self._ready_locked(worker):
                return None
            job = self._queue.pop()
            job.taken = True
            self._taken += 1
            self._taken_by[id(job)] = (worker, job)
        self._notify_state()
        return job

    def job_ended(self, job: WorkerJob) -> None:
        """A taken job was answered: it no longer counts as running (a worker calls this last)."""
        with self._lock:
            self._untake_locked(job)
        self._notify_state()

    def _untake_locked(self, job: WorkerJob) -> None:
        if job.taken:
            job.taken = False
            self._taken -= 1
            self._taken_by.pop(id(job), None)

    def _ready_locked(self, worker: DeviceWorker) -> bool:
        return (
            bool(self._queue) and self._paused_reason is None and not self._stopping
            and (worker.accepting or (worker.accepting_audio and self._audio_next_locked()))
            and worker.device_id not in self._recovering
        )

    def _audio_next_locked(self) -> bool:
        """The job a worker would take next is speech (it may use the worker's audio slot)."""
        jobs = self._queue.jobs()
        return bool(jobs) and jobs[0].handle.request.priority == Priority.AUDIO

    # health: thermal level, watchdog, recovery -------------------------------------------------
    @property
    def recovering(self) -> set[int]:
        return set(self._recovering)

    @property
    def failed_devices(self) -> dict[int, str]:
        return dict(self._failed)

    def add_event_listener(self, listener: EventListener) -> None:
        self._listeners.add_event(listener)

    def emit_event(self, name: str, **fields: Any) -> None:
        self._listeners.emit(name, fields)

    def set_thermal(self, device_id: int, level: ThermalLevel) -> None:
        for worker in self.workers:
            if worker.device_id == device_id:
                worker.thermal = level
        with self._work:
            self._work.notify_all()
        self._notify_state()

    def check_watchdog(self, now: float | None = None) -> list[int]:
        """Start a recovery for every device whose current step overran ``step_timeout``."""
        now = time.monotonic() if now is None else now
        hung = []
        for worker in list(self.workers):
            started = worker.step_started
            if started is None or worker.abandoned or worker.device_id in self._recovering:
                continue
            if now - started > self.config.step_timeout:
                hung.append(worker.device_id)
                limit = self.config.step_timeout
                reason = f"a step ran {now - started:.1f} s (limit {limit:g} s): device hung"
                self.emit_event("device_hung", device=worker.device_id, reason=reason)
                self.start_recovery(worker, reason)
        return hung

    def device_fault(self, worker: DeviceWorker, reason: str) -> None:
        """Called by a worker whose step failed because the device went away."""
        self.emit_event("device_fault", device=worker.device_id, reason=reason)
        self.start_recovery(worker, reason)

    def recover_device(self, device_id: int, reason: str) -> bool:
        """Start a recovery of this device (it stopped answering); False when one runs already."""
        worker = next((w for w in list(self.workers) if w.device_id == device_id), None)
        return worker is not None and self.start_recovery(worker, reason)

    def start_recovery(self, worker: DeviceWorker, reason: str) -> bool:
        with self._work:
            if worker.device_id in self._recovering or self._stopping:
                return False
            self._recovering.add(worker.device_id)
            self._failed.pop(worker.device_id, None)
        self._notify_state()
        Recovery(self, worker, reason).start()
        return True

    def restart(self, reason: str = "restart requested") -> list[int]:
        """The ``restart`` op: every device goes through the recovery (``npu.engine.recovery``):
        running jobs are taken over, the card is rebooted, its sessions are closed, then the models
        are loaded again."""
        return [w.device_id for w in list(self.workers) if self.start_recovery(w, reason)]

    def requeue_after_fault(self, jobs: list[WorkerJob]) -> None:
        """Jobs that were running when the device failed: retried once, first in line."""
        retry: list[WorkerJob] = []
        give_up: list[WorkerJob] = []
        for job in jobs:
            (give_up if job.attempts >= 1 else retry).append(job)
        with self._work:
            for job in jobs:
                self._untake_locked(job)
            for job in retry:
                job.attempts += 1
                job.kind.retry(job)
                job.handle.status = "queued"
                self._queue.push_front(job)
            self._work.notify_all()
        message = "the device was reset twice while this job ran; it was not retried again"
        for job in give_up:
            self.answer(job, Failed(EngineError(ErrorCode.DEVICE_RESET, message)))
        if retry:
            self.emit_event("jobs_retried", count=len(retry))
        self._notify_state()

    def replace_worker(self, old: DeviceWorker) -> DeviceWorker:
        """A fresh worker for the device (it reloads the models); the old thread is abandoned."""
        old.abandoned = True
        fresh = self._new_worker(old.device_id)
        fresh.thermal = old.thermal
        self.workers = [fresh if w is old else w for w in self.workers]
        fresh.start()
        return fresh

    def end_recovery(self, device_id: int) -> None:
        with self._work:
            self._recovering.discard(device_id)
            self._work.notify_all()
        self._notify_state()

    def device_failed(self, device_id: int, reason: str) -> None:
        """Give up on a device; with no device left, every waiting job is answered with why."""
        with self._work:
            self._recovering.discard(device_id)
            self._failed[device_id] = reason
            all_failed = len(self._failed) == len(self.workers)
            waiting = self._queue.take_all() if all_failed else []
            self._work.notify_all()
        self.emit_event("device_failed", device=device_id, reason=reason)
        for job in waiting:
            self.answer(job, Failed(EngineError(ErrorCode.UNAVAILABLE, self._failed_message())))
        self._notify_state()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def answer(self, job: WorkerJob, event: Done | Failed) -> None:
        """The one way a job ends, waiting or taken: count it, feed the metrics, deliver the terminal
        event, then stop counting it as running (the state says idle only once a job is answered)."""
        self.count_outcome(isinstance(event, Done))
        if isinstance(event, Failed):
            self.metrics.failure.labels(event.error.code.value).inc()
        else:
            job.kind.record(self.metrics, job.model_id, event)
            self.places.learn(job, event.result)
        try:
            job.handle.finish(event)
        except Exception:
            logger.exception("sink of job %s failed on its final event", job.handle.id)
        self.job_ended(job)

    def count_outcome(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.jobs_done += 1
            else:
                self.jobs_failed += 1

    def record_duration(self, seconds: float) -> None:
        with self._lock:
            self._durations = [*self._durations[-19:], seconds]

    def _retry_after_locked(self) -> float:
        recent = self._durations or [5.0]
        per_job = sum(recent) / len(recent)
        slots = max(1, sum(w.max_active for w in self.workers))
        return round(max(1.0, per_job * (len(self._queue) + 1) / slots), 1)

    def _any_runner(self, model_id: str) -> Runner:
        for worker in self.workers:
            runner = worker.runners.get(model_id)
            if runner is not None:
                return runner
        failed = [w.reason for w in self.workers if w.reason and w.loaded.is_set()]
        if failed:
            raise EngineError(ErrorCode.UNAVAILABLE, f"model {model_id!r} is not available: {failed[0]}")
        raise EngineError(
            ErrorCode.UNAVAILABLE, f"model {model_id!r} is not loaded yet; retry shortly", retry_after=5
        )

    def _notify_state(self, force: bool = False) -> None:
        """Hand the state to the listeners when it changed (or always, ``force``: a reconnect)."""
        self._listeners.notify(force)
        self.places.announce(self._plan, urgent=True)  # the queue may have moved: new positions

    notify_state = _notify_state

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until nothing is queued or running (tests, clean shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state.queue_depth == 0 and state.running == 0:
                return True
            time.sleep(0.02)
        return False
