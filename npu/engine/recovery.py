"""Bringing a device back after it hung or faulted, without a person.

The recovery runs on its own thread, since the worker's thread may be stuck inside the hung call.
Its order matters on a real card:

1. take the worker's running jobs over (each is retried once, and its client never sees a
   repeated word); jobs still waiting in the queue simply wait;
2. reboot the card through its monitor (``axcl-smi reboot``, then wait until the runtime sees the
   card again); ``axclrtResetDevice`` is never used: it releases this process's context on the
   device under live sessions and reboots nothing;
3. close every session the abandoned worker holds on that card (a hung thread's too: they are on
   a card that was just rebooted), each close on its own, logged when it fails; then drop them and
   give their memory back;
4. only then start a fresh worker, which loads the models again, and wait until they are loaded.

After ``attempts`` failures, with a doubling pause between them, the device is declared failed: the
engine then answers every request with a clear error instead of crash-looping. The ``restart``
control (``Engine.restart``) takes the same path.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from npu.device.base import DeviceResetError
from npu.engine.config import RecoveryConfig
from npu.engine.job import WorkerJob
from npu.engine.metrics import EngineMetrics
from npu.engine.worker import DeviceWorker
from npu.runtime.memory import release_freed_memory

logger = logging.getLogger(__name__)

CLOSE_GRACE = 2.0  # seconds an abandoned worker that is not hung gets to end its step


__all__ = ["Recovery", "RecoveryConfig", "RecoveryHost", "close_sessions", "recovery_delays"]


class RecoveryHost(Protocol):
    """What a recovery needs of the engine: its events, its queue, and a fresh worker."""

    @property
    def recovery_config(self) -> RecoveryConfig: ...
    @property
    def metrics(self) -> EngineMetrics: ...
    @property
    def stopping(self) -> bool: ...
    @property
    def stop_event(self) -> threading.Event: ...

    def emit_event(self, name: str, **fields: Any) -> None: ...
    def requeue_after_fault(self, jobs: list[WorkerJob]) -> None: ...
    def replace_worker(self, old: DeviceWorker) -> DeviceWorker: ...
    def end_recovery(self, device_id: int) -> None: ...
    def device_failed(self, device_id: int, reason: str) -> None: ...


def recovery_delays(config: RecoveryConfig) -> list[float]:
    """The pause before each attempt: none before the first, then doubling up to the cap."""
    return [0.0] + [min(config.backoff * 2**i, config.backoff_max) for i in range(config.attempts - 1)]


class Recovery(threading.Thread):
    def __init__(self, engine: RecoveryHost, worker: DeviceWorker, reason: str) -> None:
        super().__init__(name=f"recovery-dev{worker.device_id}", daemon=True)
        self.engine = engine
        self.worker = worker
        self.reason = reason

    def run(self) -> None:
        engine, device = self.engine, self.worker.device_id
        started = time.monotonic()
        engine.emit_event("recovery_started", device=device, reason=self.reason)
        engine.requeue_after_fault(self.worker.take_jobs())
        last_error = self.reason
        for attempt, delay in enumerate(recovery_delays(engine.recovery_config), start=1):
            if engine.stopping or engine.stop_event.wait(delay):
                return
            engine.emit_event("device_reset", device=device, attempt=attempt)
            try:
                if self.worker.monitor is not None:
                    self.worker.monitor.reset(device)  # reboots the card and waits until it answers
            except DeviceResetError as exc:
                last_error = str(exc)
            else:
                close_sessions(self.worker)
                fresh = engine.replace_worker(self.worker)  # it loads the models again
                if fresh.loaded.wait(engine.recovery_config.load_timeout) and not fresh.reason:
                    seconds = round(time.monotonic() - started, 2)
                    engine.emit_event("models_reloaded", device=device, models=sorted(fresh.runners))
                    engine.emit_event("recovered", device=device, attempts=attempt, seconds=seconds)
                    engine.metrics.recoveries.labels(str(device), "recovered").inc()
                    engine.end_recovery(device)
                    return
                last_error = fresh.reason or "the models did not load in time"
                engine.requeue_after_fault(fresh.take_jobs())
                self.worker = fresh  # the next attempt reboots, then closes what it loaded
            logger.error("device %d: recovery attempt %d failed: %s", device, attempt, last_error)
            engine.emit_event("recovery_attempt_failed", device=device, attempt=attempt, error=last_error)
        engine.metrics.recoveries.labels(str(device), "failed").inc()
        tries = engine.recovery_config.attempts
        engine.device_failed(device, f"{self.reason}; {tries} recovery attempts failed, last: {last_error}")


def close_sessions(worker: DeviceWorker, grace: float = CLOSE_GRACE) -> None:
    """Close the abandoned worker's models (their sessions on the rebooted card), then drop them.

    A worker that was not hung (a ``restart``) ends at its next step: it gets ``grace`` seconds to,
    so no step of it runs while its sessions close. A thread still stuck in a hung call is not
    waited for: its sessions are on a card that was rebooted, and they must be closed before the
    same models are loaded again. Each close is on its own: one failing never keeps the others open.
    """
    if worker.ident is not None and worker is not threading.current_thread():
        worker.join(grace)
    if worker.is_alive():
        logger.warning("device %d: the old worker is still inside a call; its sessions are closed "
                       "anyway (the card was rebooted under them)", worker.device_id)
    for model_id, runner in list(worker.runners.items()):
        try:
            runner.close()
        except Exception:
            logger.exception("device %d: closing %s after the reboot failed", worker.device_id, model_id)
        else:
            logger.info("device %d: %s closed after the reboot", worker.device_id, model_id)
    worker.runners.clear()
    release_freed_memory()
