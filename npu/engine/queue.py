"""The bounded wait before a worker takes a job: priority class first, then senders in turn.

Within a priority class every sender has its own lane (its jobs in arrival order), and the lanes
are served round-robin: a sensor that floods fifty prompts gets one turn in each round, like
every other sender, instead of the next fifty. A sender with nothing waiting leaves the rotation
and joins at its end when it sends again. A job retried after a device reset goes before every
job of its class that never started. ``order()`` is the service order as it stands (what a
worker takes next, and after it), and ``position`` one job's place in it.

Priority classes are plain integers, lower first (``npu.engine.api.Priority`` names the usual
ones), so a new class is a new number, not a change here.

Not thread-safe on its own: the engine holds its lock around every call, so taking a job and
counting it as running happen in one hold.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

from npu.engine.api import EngineError, JobHandle
from npu.engine.job import WorkerJob, expires_at, expiry_error

ANONYMOUS = "-"  # the lane of jobs whose request names no sender


def request_sender(request: object) -> str:
    """Who a request counts as; a job kind's request without a ``sender`` is anonymous."""
    return getattr(request, "sender", None) or ANONYMOUS


def sender_of(job: WorkerJob) -> str:
    return request_sender(job.handle.request)


class _Class:
    """One priority class: retried jobs first, then the senders' lanes in rotation order."""

    def __init__(self) -> None:
        self.front: deque[WorkerJob] = deque()
        self.lanes: OrderedDict[str, deque[WorkerJob]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.front) + sum(len(lane) for lane in self.lanes.values())

    def pop(self) -> WorkerJob:
        if self.front:
            return self.front.popleft()
        sender, lane = next(iter(self.lanes.items()))
        job = lane.popleft()
        if lane:
            self.lanes.move_to_end(sender)  # its next job waits for everyone else's turn
        else:
            del self.lanes[sender]
        return job

    def order(self) -> Iterator[WorkerJob]:
        """What successive ``pop`` calls would return, without taking anything."""
        yield from self.front
        lanes = list(self.lanes.values())
        for turn in range(max((len(lane) for lane in lanes), default=0)):
            for lane in lanes:
                if turn < len(lane):
                    yield lane[turn]

    def drop(self, gone: Callable[[WorkerJob], bool]) -> list[WorkerJob]:
        removed = [job for job in self.front if gone(job)]
        self.front = deque(job for job in self.front if not gone(job))
        for sender, lane in list(self.lanes.items()):
            removed += [job for job in lane if gone(job)]
            kept = deque(job for job in lane if not gone(job))
            if kept:
                self.lanes[sender] = kept
            else:
                del self.lanes[sender]
        return removed


class JobQueue:
    def __init__(self) -> None:
        self._classes: dict[int, _Class] = {}
        self._waiting: dict[str, int] = {}  # sender -> jobs waiting

    def __len__(self) -> int:
        return sum(self._waiting.values())

    def _class(self, job: WorkerJob) -> _Class:
        return self._classes.setdefault(int(job.handle.request.priority), _Class())

    def _count(self, job: WorkerJob, delta: int) -> None:
        sender = sender_of(job)
        left = self._waiting.get(sender, 0) + delta
        if left > 0:
            self._waiting[sender] = left
        else:
            self._waiting.pop(sender, None)

    def push(self, job: WorkerJob) -> None:
        self._class(job).lanes.setdefault(sender_of(job), deque()).append(job)
        self._count(job, 1)

    def push_front(self, job: WorkerJob) -> None:
        self._class(job).front.append(job)
        self._count(job, 1)

    def pop(self) -> WorkerJob:
        """The next job in ``order()``; raises ``IndexError`` when nothing waits."""
        for priority in sorted(self._classes):
            klass = self._classes[priority]
            if len(klass):
                job = klass.pop()
                self._count(job, -1)
                return job
        raise IndexError("pop from an empty job queue")

    def order(self) -> list[WorkerJob]:
        """Every waiting job in the order workers will take them, if nothing else arrives."""
        return [job for priority in sorted(self._classes) for job in self._classes[priority].order()]

    def position(self, handle: JobHandle) -> int | None:
        """How many jobs a worker takes before this one (0: next); None when it is not waiting."""
        return next((i for i, job in enumerate(self.order()) if job.handle is handle), None)

    def jobs(self) -> list[WorkerJob]:
        return self.order()

    def waiting_of(self, sender: str | None) -> int:
        """Jobs of this sender waiting now."""
        return self._waiting.get(sender or ANONYMOUS, 0)

    def waiting_by_sender(self) -> dict[str, int]:
        return dict(self._waiting)

    def take_all(self) -> list[WorkerJob]:
        jobs = self.order()
        self._classes.clear()
        self._waiting.clear()
        return jobs

    def _drop(self, gone: Callable[[WorkerJob], bool]) -> list[WorkerJob]:
        removed = [job for klass in self._classes.values() for job in klass.drop(gone)]
        for job in removed:
            self._count(job, -1)
        return removed

    def remove(self, handle: JobHandle) -> WorkerJob | None:
        """Take the waiting job of this handle out; None when it is not waiting (a worker took it)."""
        removed = self._drop(lambda job: job.handle is handle)
        return removed[0] if removed else None

    def take_expired(self, request_timeout: float, now: float) -> list[tuple[WorkerJob, EngineError]]:
        """Remove and return every waiting job past its deadline or the request timeout, with why."""
        expired = [(job, error) for job in self.order()
                   if (error := expiry_error(job, request_timeout, now)) is not None]
        if expired:
            gone = {id(job) for job, _ in expired}
            self._drop(lambda job: id(job) in gone)
        return expired

    def next_expiry(self, request_timeout: float) -> float | None:
        """When the first waiting job expires (None: no job ever does)."""
        return min((t for job in self.order() if (t := expires_at(job, request_timeout)) is not None),
                   default=None)
