"""Each job's place (queued at a position, or running) and its expected wait, sent to its sink.

The engine asks the queue for its service order (``JobQueue.order``) and for the jobs each worker
took and has not answered, and ``npu.engine.eta`` plays them forward with the measured figures. A
job hears of its place as a ``Place`` event: when its position changes (at once), when it starts
running (at once), and otherwise at most once every ``every`` seconds when its estimate moved, so
a queue of thirty does not flood the broker. A job that a free slot takes at once never waits, so
it hears no queued place; a job at position 1 while every slot is busy waits for the earliest
expected end of the jobs the workers took (from the taking, not the first step), so the wait
grows with the position. A job's kind tells the phases of its steps and the work it will do
(``eta_phase``, ``eta_work``, ``eta_units``, ``eta_progress``); for a kind without them (speech)
each job's whole device time is the one figure, so its wait is its model's average job. A
waiting job's wait also counts the higher-priority work that has kept arriving lately (device
seconds per second over the last two minutes), since that work will go first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from npu.engine.api import ChatResult, ImageResult, Place, QueueInfo
from npu.engine.eta import Figures, Planned, Work, forecast
from npu.engine.job import WorkerJob

logger = logging.getLogger(__name__)

__all__ = ["Places", "Plan", "QueueInfo"]

# The waiting jobs in service order, and per worker its slot count and the jobs it steps.
Plan = tuple[list[WorkerJob], list[tuple[int, list[WorkerJob]]]]
MOVED_S = 1.0  # an estimate that moved less than this is not sent again
WHOLE_JOB = "job"  # the one phase of a kind that names none: its jobs' device time as a whole
ARRIVALS_S = 120.0  # the recent past that says how much higher-priority work keeps arriving
MAX_LOAD = 0.9


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


class Places:
    def __init__(self, every: float = 1.0) -> None:
        self.figures = Figures()
        self.every = every
        self._lock = threading.Lock()  # one announcement at a time, so places arrive in order
        self._last = 0.0
        self._arrivals: deque[tuple[float, int, float]] = deque()  # (when, priority, device seconds)

    # the figures ------------------------------------------------------------------------------
    def step(self, job: WorkerJob, step: object, seconds: float) -> None:
        """A worker ran one step of ``job`` in ``seconds``: add them to its phase."""
        phase_of = getattr(job.kind, "eta_phase", None)
        phase = WHOLE_JOB if phase_of is None else str(phase_of(job, step))
        spent = job.spent.setdefault(phase, [0.0, 0.0])
        spent[0] += seconds
        spent[1] += 1

    def learn(self, job: WorkerJob, result: ChatResult | ImageResult | Any) -> None:
        """A job ended well: its phases' device time per unit of work feeds the figures. A job
        retried after a reset is left out (its time includes the lost run)."""
        units_of = getattr(job.kind, "eta_units", None)
        if job.attempts:
            return
        try:
            units = {WHOLE_JOB: 1} if units_of is None else units_of(job, result)
        except Exception:
            logger.exception("the work of job %s could not be counted", job.handle.id)
            return
        for phase, (seconds, steps) in job.spent.items():
            done = units.get(phase, 0)
            if done > 0:
                self.figures.learn(job.model_id, phase, float(done), seconds, int(steps))

    def _planned(self, job: WorkerJob, running: bool) -> Planned:
        work_of = getattr(job.kind, "eta_work", None)
        cost = self.figures.cost(job.model_id, {WHOLE_JOB: Work(1)} if work_of is None else work_of(job))
        if cost is None:
            return Planned(id(job), None, None)
        seconds, steps = cost
        if running:
            spent = list(job.spent.values())  # the worker adds to it meanwhile
            spent_s = sum(s for s, _ in spent)
            spent_n = sum(n for _, n in spent)
            per_step = seconds / steps
            steps = max(1.0, steps - spent_n)
            seconds = max(per_step, seconds - spent_s)
        return Planned(id(job), seconds, steps)

    # the forecast -----------------------------------------------------------------------------
    def forecast(self, plan: Plan) -> tuple[dict[object, float | None], dict[object, float | None],
                                            float | None]:
        waiting, devices = plan
        result = forecast(
            [(slots, [self._planned(j, True) for j in running]) for slots, running in devices],
            [self._planned(j, False) for j in waiting],
        )
        return result.starts, result.ends, result.next_free

    def info(self, plan: Plan, queue_max: int) -> QueueInfo:
        waiting, devices = plan
        _, _, next_free = self.forecast(plan)
        return QueueInfo(length=len(waiting), running=sum(len(r) for _, r in devices), queue_max=queue_max,
                         eta_s=_round(next_free), figures=self.figures.as_dict())

    # announcing -------------------------------------------------------------------------------
    def announce(self, plan_of: Callable[[], Plan], urgent: bool = False) -> None:
        """Send every job whose place changed its new place. ``urgent``: the queue changed or a job
        started, so positions go out now; else (after a step) at most every ``every`` seconds."""
        now = time.monotonic()
        if not urgent and now - self._last < self.every:
            return
        with self._lock:
            self._last = now
            try:
                plan = plan_of()
                waiting, devices = plan
                starts, ends, _ = self.forecast(plan)
                self._arrived([j for j in waiting if j.place is None], now)
                self._arrived([j for _, running in devices for j in running if j.place is None], now)
                free = sum(max(0, slots - len(running)) for slots, running in devices)
                for i, job in enumerate(waiting):
                    if i < free:
                        continue  # a free slot takes it now: it does not wait, so no queued place
                    start = starts.get(id(job))
                    if start is not None:
                        start /= 1.0 - self._load_above(int(job.handle.request.priority), now, len(devices))
                    self._send(job, Place("queued", i + 1, _round(start)), now)
                for _, running in devices:
                    for job in running:
                        step, steps = self._progress(job)
                        self._send(job, Place("running", None, _round(ends.get(id(job))), step, steps), now)
            except Exception:  # a notice must never break a submit, a step or a job's end
                logger.exception("announcing the queue's places failed")

    def _arrived(self, jobs: list[WorkerJob], now: float) -> None:
        """Remember new jobs' priority and expected device time (the arrivals of the recent past)."""
        for job in jobs:
            seconds = self._planned(job, False).seconds
            if seconds is not None:
                self._arrivals.append((now, int(job.handle.request.priority), seconds))
        while self._arrivals and now - self._arrivals[0][0] > ARRIVALS_S:
            self._arrivals.popleft()

    def _load_above(self, priority: int, now: float, devices: int) -> float:
        """The share of the devices that higher-priority work arriving has taken lately: a job of
        this priority still waiting gets only the rest, as later chats overtake a waiting picture."""
        if not self._arrivals or devices == 0:
            return 0.0
        work = sum(seconds for _, p, seconds in self._arrivals if p < priority)
        return min(MAX_LOAD, work / (ARRIVALS_S * devices))  # over the whole window: a burst counts once

    @staticmethod
    def _progress(job: WorkerJob) -> tuple[int | None, int | None]:
        progress_of = getattr(job.kind, "eta_progress", None)
        if progress_of is None:
            return None, None
        step, steps = progress_of(job)
        return int(step), None if steps is None else int(steps)

    def _send(self, job: WorkerJob, place: Place, now: float) -> None:
        last: Place | None = job.place
        if last is not None and last.state == place.state and last.position == place.position:
            if now - job.place_at < self.every:
                return
            before, after = last.eta_s, place.eta_s
            moved = (before is None) != (after is None) or (
                before is not None and after is not None and abs(before - after) >= MOVED_S)
            if not moved and last.step == place.step:
                return
        handle = job.handle
        if handle.status in ("done", "failed") or handle.cancelled:
            return
        job.place, job.place_at = place, now
        try:
            handle.notify(place)  # never after the job's end
        except Exception:
            logger.exception("sink of job %s failed on its place", handle.id)

