"""The bounded wait before a worker takes a job: priority first, then arrival.

Not thread-safe on its own: the engine holds its lock around every call, so taking a job and
counting it as running happen in one hold. A job retried after a device reset goes before every
job of its priority that never started.
"""

from __future__ import annotations

import heapq
import itertools

from npu.engine.api import EngineError, JobHandle
from npu.engine.job import WorkerJob, expires_at, expiry_error


class JobQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int, WorkerJob]] = []
        self._seq = itertools.count()
        self._front = itertools.count(-1, -1)  # sequence numbers that put a retried job first

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, job: WorkerJob) -> None:
        heapq.heappush(self._heap, (int(job.handle.request.priority), next(self._seq), job))

    def push_front(self, job: WorkerJob) -> None:
        heapq.heappush(self._heap, (int(job.handle.request.priority), next(self._front), job))

    def pop(self) -> WorkerJob:
        return heapq.heappop(self._heap)[2]

    def jobs(self) -> list[WorkerJob]:
        return [job for *_, job in self._heap]

    def order(self) -> list[WorkerJob]:
        """Every waiting job in the order workers will take them, if nothing else arrives: what
        queue positions and waiting times are computed from."""
        return [job for *_, job in sorted(self._heap, key=lambda item: item[:2])]

    def take_all(self) -> list[WorkerJob]:
        jobs = self.jobs()
        self._heap.clear()
        return jobs

    def remove(self, handle: JobHandle) -> WorkerJob | None:
        """Take the waiting job of this handle out; None when it is not waiting (a worker took it)."""
        found = next((job for *_, job in self._heap if job.handle is handle), None)
        if found is not None:
            self._heap = [item for item in self._heap if item[2] is not found]
            heapq.heapify(self._heap)
        return found

    def take_expired(self, request_timeout: float, now: float) -> list[tuple[WorkerJob, EngineError]]:
        """Remove and return every waiting job past its deadline or the request timeout, with why."""
        expired = [(job, error) for *_, job in self._heap
                   if (error := expiry_error(job, request_timeout, now)) is not None]
        if expired:
            gone = {id(job) for job, _ in expired}
            self._heap = [item for item in self._heap if id(item[2]) not in gone]
            heapq.heapify(self._heap)
        return expired

    def next_expiry(self, request_timeout: float) -> float | None:
        """When the first waiting job expires (None: no job ever does)."""
        return min((t for *_, job in self._heap if (t := expires_at(job, request_timeout)) is not None),
                   default=None)
