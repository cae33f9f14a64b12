"""A job as the engine carries it from the queue to its answer, and when a waiting job expires."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from npu.engine.api import EngineError, ErrorCode, JobHandle

if TYPE_CHECKING:
    from npu.engine.kinds import JobKind


@dataclass
class WorkerJob:
    handle: JobHandle
    model_id: str
    kind: JobKind
    state: Any = None  # the kind's own progress, kept across a retry (a chat's prompt and text sent)
    started: float = 0.0
    attempts: int = 0  # starts after a device reset (a job is retried once)
    stream: Iterator[Any] | None = None  # the kind's steps, once a worker started the job
    taken: bool = False  # taken from the queue by a worker and not yet ended (the engine's count)
    # Device seconds and steps spent per phase (``npu.engine.eta``), and the last place announced.
    spent: dict[str, list[float]] = field(default_factory=dict)
    place: Any = None
    place_at: float = 0.0


def expiry_error(job: WorkerJob, request_timeout: float, now: float) -> EngineError | None:
    """Why a job that has not started yet may no longer start, or None.

    A job waits until its deadline (``expired``) and never longer than the request timeout
    (``timeout``), whether the queue moves, is paused or a card is too hot. A job retried after a
    device reset already had its turn: it is never expired.
    """
    if job.attempts:
        return None
    handle = job.handle
    waited = now - handle.submitted
    deadline = handle.request.deadline
    if deadline is not None and now >= deadline and deadline <= handle.submitted + request_timeout:
        return EngineError(ErrorCode.EXPIRED, f"waited {waited:.1f} s, past its deadline")
    if waited >= request_timeout:
        return EngineError(ErrorCode.TIMEOUT, f"waited {waited:.1f} s without starting, longer than the "
                                              f"request timeout ({request_timeout:g} s)")
    return None


def expires_at(job: WorkerJob, request_timeout: float) -> float | None:
    """When ``expiry_error`` starts to answer for this job (None: never)."""
    if job.attempts:
        return None
    limit = job.handle.submitted + request_timeout
    deadline = job.handle.request.deadline
    return limit if deadline is None else min(deadline, limit)
