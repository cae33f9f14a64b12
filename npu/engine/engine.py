"""The resident engine: models kept loaded, a bounded job queue, one worker per device.

Both front doors submit here. ``submit`` validates and tokenizes on the caller's thread, so a bad
request is refused at once with a typed error; accepted jobs wait in a bounded priority queue and
are run by the device workers step by step (see ``npu.engine.worker``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from npu.engine.api import (
    ChatRequest,
    EngineError,
    EngineState,
    ErrorCode,
    Failed,
    JobHandle,
    ModelInfo,
    Sink,
)
from npu.engine.metrics import EngineMetrics
from npu.engine.worker import DeviceWorker, ModelSpec, RunnerLoader, WorkerJob
from npu.llm.runner import ContextLengthError

logger = logging.getLogger(__name__)

StateListener = Callable[[EngineState], None]
STOPPING = "the appliance is stopping; retry later"


@dataclass(frozen=True)
class EngineConfig:
    queue_max: int = 32
    request_timeout: float = 120.0
    step_timeout: float = 30.0
    max_active: int = 2


class Engine:
    """Owns the queue and the device workers; thread-safe."""

    def __init__(
        self,
        models: Sequence[ModelSpec],
        *,
        config: EngineConfig | None = None,
        device_ids: Sequence[int] = (0,),
        loader: RunnerLoader | None = None,
    ) -> None:
        if not models:
            raise ValueError("the engine needs at least one model")
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique: {ids}")
        self.config = config or EngineConfig()
        self.specs = {m.id: m for m in models}
        chat = [m for m in models if m.kind == "chat"]
        self.default_chat = next((m.id for m in chat if m.default), chat[0].id if chat else None)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: list[tuple[int, int, WorkerJob]] = []
        self._seq = itertools.count()
        self._listeners: list[StateListener] = []
        self._paused_reason: str | None = None
        self._stopping = False
        self._last_state: EngineState | None = None
        self._durations: list[float] = []
        self.jobs_done = 0
        self.jobs_failed = 0
        self.metrics = EngineMetrics(lambda: len(self._queue), lambda: sum(w.running for w in self.workers))
        self.workers = [
            DeviceWorker(device_id, list(models), self, loader=loader, max_active=self.config.max_active)
            for device_id in device_ids
        ]

    # lifecycle -------------------------------------------------------------------------------
    def start(self, *, wait_loaded: bool = True, timeout: float | None = None) -> None:
        for worker in self.workers:
            worker.start()
        if wait_loaded:
            for worker in self.workers:
                worker.loaded.wait(timeout)
        self._notify_state()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the workers; jobs still waiting are answered ``unavailable``, never dropped."""
        with self._work:
            self._stopping = True
            waiting = [job for _, _, job in self._queue]
            self._queue.clear()
            self._work.notify_all()
        for job in waiting:
            self.count_outcome(False)
            self.metrics.failure.labels(ErrorCode.UNAVAILABLE.value).inc()
            job.handle.finish(Failed(EngineError(ErrorCode.UNAVAILABLE, STOPPING)))
        for worker in self.workers:
            worker.join(timeout)
        self._notify_state()

    # front-door API --------------------------------------------------------------------------
    def submit(self, request: ChatRequest, sink: Sink) -> JobHandle:
        """Validate, tokenize and queue a job, or raise ``EngineError`` at once."""
        try:
            return self._submit(request, sink)
        except EngineError as exc:
            self.metrics.rejected.labels(exc.code.value).inc()
            raise

    def _submit(self, request: ChatRequest, sink: Sink) -> JobHandle:
        model_id = request.model or self.default_chat
        spec = self.specs.get(model_id or "")
        if spec is None or spec.kind != "chat":
            available = ", ".join(m for m, s in self.specs.items() if s.kind == "chat") or "none"
            raise EngineError(
                ErrorCode.MODEL_NOT_FOUND, f"no chat model {request.model!r} here; available: {available}"
            )
        runner = self._any_runner(spec.id)
        try:
            if request.messages is not None:
                prompt_ids = runner.encode_chat(request.messages, enable_thinking=request.enable_thinking)
            else:
                prompt_ids = runner.encode(request.prompt or "")
            runner.check_prompt(prompt_ids)
        except ContextLengthError as exc:
            details = {"prompt_tokens": exc.prompt_tokens, "max_prompt_tokens": exc.limit,
                       "context_length": runner.context_length}
            raise EngineError(ErrorCode.CONTEXT_LENGTH_EXCEEDED, str(exc), details=details) from exc
        except ValueError as exc:
            raise EngineError(ErrorCode.BAD_REQUEST, str(exc)) from exc
        handle = JobHandle(request, sink)
        handle.on_cancel = self._drop_queued
        job = WorkerJob(handle=handle, model_id=spec.id, prompt_ids=prompt_ids)
        with self._work:
            if self._stopping:
                raise EngineError(ErrorCode.UNAVAILABLE, STOPPING, retry_after=5)
            if len(self._queue) >= self.config.queue_max:
                raise EngineError(
                    ErrorCode.BUSY,
                    f"the queue is full ({self.config.queue_max} waiting); retry later",
                    retry_after=self._retry_after_locked(),
                )
            heapq.heappush(self._queue, (int(request.priority), next(self._seq), job))
            self._work.notify_all()
        self._notify_state()
        return handle

    def cancel(self, request_id: str) -> int:
        """Cancel every queued or running job submitted with this request id."""
        count = 0
        with self._work:
            queued = [job.handle for _, _, job in self._queue if job.handle.request.request_id == request_id]
        for handle in queued:
            handle.cancel()
        count += len(queued)
        for worker in self.workers:
            count += worker.cancel(request_id)
        return count

    def _drop_queued(self, handle: JobHandle) -> None:
        """A waiting job that is cancelled frees its place in the queue at once."""
        with self._work:
            kept = [item for item in self._queue if item[2].handle is not handle]
            if len(kept) == len(self._queue):
                return  # already taken by a worker, which will stop it at its next step
            self._queue = kept
            heapq.heapify(self._queue)
        self.count_outcome(False)
        self.metrics.failure.labels(ErrorCode.CANCELLED.value).inc()
        handle.finish(Failed(EngineError(ErrorCode.CANCELLED, "cancelled while waiting")))
        self._notify_state()

    def pause(self, reason: str = "paused by request") -> None:
        with self._work:
            self._paused_reason = reason
        self._notify_state()

    def resume(self) -> None:
        with self._work:
            self._paused_reason = None
            self._work.notify_all()
        self._notify_state()

    def reload(self, model_id: str | None = None, timeout: float | None = None) -> None:
        """Reload resident models on every device once running jobs finish; queued jobs wait."""
        if model_id is not None and model_id not in self.specs:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"no model {model_id!r} here")
        done = [worker.request_reload(model_id) for worker in self.workers]
        with self._work:
            self._work.notify_all()
        self._notify_state()
        for event in done:
            event.wait(timeout)
        self._notify_state()

    def models(self) -> list[ModelInfo]:
        infos = []
        for spec in self.specs.values():
            runner = self.workers[0].runners.get(spec.id)
            infos.append(
                ModelInfo(
                    id=spec.id,
                    kind=spec.kind,
                    loaded=runner is not None,
                    backend=runner.backend if runner else None,
                    context_length=runner.context_length if runner else None,
                    max_prompt_tokens=runner.max_prompt_tokens if runner else None,
                )
            )
        return infos

    def state(self) -> EngineState:
        with self._lock:
            depth = len(self._queue)
            paused = self._paused_reason
            stopping = self._stopping
        running = sum(w.running for w in self.workers)
        if stopping:
            name = "stopped"
        elif any(w.state == "failed" for w in self.workers):
            name = "failed"
        elif any(w.state in ("recovering", "reloading") for w in self.workers):
            name = "recovering"
        elif any(not w.loaded.is_set() for w in self.workers):
            name = "loading"
        elif paused is not None:
            name = "paused"
        else:
            name = "busy" if running or depth else "idle"
        reason = paused if name == "paused" else next((w.reason for w in self.workers if w.reason), None)
        return EngineState(name, depth, running, self.config.queue_max, reason)  # type: ignore[arg-type]

    def add_state_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    # called by workers -----------------------------------------------------------------------
    def next_job(self, worker: DeviceWorker, block: bool, timeout: float = 0.5) -> WorkerJob | None:
        """The highest-priority waiting job this worker may take, waiting up to ``timeout``."""
        with self._work:
            if block and not self._ready_locked(worker):
                self._work.wait(timeout)
            if not self._ready_locked(worker):
                return None
            _, _, job = heapq.heappop(self._queue)
        self._notify_state()
        return job

    def _ready_locked(self, worker: DeviceWorker) -> bool:
        return bool(self._queue) and self._paused_reason is None and not self._stopping and worker.accepting

    @property
    def stopping(self) -> bool:
        return self._stopping

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

    def _any_runner(self, model_id: str):  # type: ignore[no-untyped-def]
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

    def _notify_state(self) -> None:
        state = self.state()
        with self._lock:
            if state == self._last_state:
                return
            self._last_state = state
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("state listener failed")

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
