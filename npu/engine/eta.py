"""Waiting times from measured figures: each model's seconds per unit of work, and the queue's order.

The worker times every step on the device and the job's kind says which phase the step was
(``prefill``, ``decode`` for chat; ``text``, ``unet``, ``vae`` for images). When a job ends, its
kind counts the units each phase did (prompt tokens, generated tokens, UNet steps), and
``Figures`` keeps, per model and phase, a moving average of seconds per unit, steps per unit and
units per job. Nothing is guessed: a model without a finished job has no figures, and its jobs'
``eta_s`` is None until one ends.

``forecast`` plays the device workers forward: each worker runs up to its slot count of jobs,
one step each per round (round-robin, as ``npu.engine.worker`` does), so a job's share of the
device is its steps, not its seconds; a waiting job takes the first slot that frees. The result is
when each waiting job starts, when each job ends, and when a slot would be free for a new job.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

ALPHA = 0.3  # weight of the newest job in the moving averages


@dataclass(frozen=True)
class Work:
    """What a job will ask of one phase: ``units`` when known, else typical for the model, at most
    ``at_most`` (a chat's ``max_tokens``)."""

    units: float | None
    at_most: float | None = None


@dataclass
class PhaseFigures:
    seconds_per_unit: float
    steps_per_unit: float
    units_per_job: float


def _ema(old: float, new: float) -> float:
    return old + ALPHA * (new - old)


class Figures:
    """The measured figures, per model and phase; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], PhaseFigures] = {}

    def learn(self, model: str, phase: str, units: float, seconds: float, steps: int) -> None:
        """One finished job's phase: ``units`` of work took ``seconds`` of device time in ``steps``."""
        if seconds <= 0 or steps <= 0:
            return
        per_unit = seconds / units if units > 0 else seconds
        steps_per_unit = steps / units if units > 0 else steps
        with self._lock:
            old = self._phases.get((model, phase))
            if old is None:
                self._phases[(model, phase)] = PhaseFigures(per_unit, steps_per_unit, units)
            else:
                old.seconds_per_unit = _ema(old.seconds_per_unit, per_unit)
                old.steps_per_unit = _ema(old.steps_per_unit, steps_per_unit)
                old.units_per_job = _ema(old.units_per_job, units)

    def of(self, model: str, phase: str) -> PhaseFigures | None:
        with self._lock:
            found = self._phases.get((model, phase))
            return None if found is None else PhaseFigures(**vars(found))

    def as_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        """model -> phase -> figures, for the bench and the docs."""
        with self._lock:
            out: dict[str, dict[str, dict[str, float]]] = {}
            for (model, phase), f in self._phases.items():
                out.setdefault(model, {})[phase] = {k: round(v, 6) for k, v in vars(f).items()}
            return out

    def cost(self, model: str, work: Mapping[str, Work]) -> tuple[float, float] | None:
        """Expected device seconds and steps of a whole job; None when a phase was never measured."""
        seconds = steps = 0.0
        for phase, want in work.items():
            f = self.of(model, phase)
            if f is None:
                return None
            units = want.units if want.units is not None else f.units_per_job
            if want.at_most is not None:
                units = min(units, want.at_most)
            seconds += units * f.seconds_per_unit
            steps += max(1.0, units * f.steps_per_unit) if units > 0 else 0.0
        return seconds, max(1.0, steps)


@dataclass
class Planned:
    """A job as the forecast sees it: expected device seconds and steps left (None: unknown)."""

    key: object
    seconds: float | None
    steps: float | None


@dataclass
class _Slot:
    key: object
    seconds: float
    steps: float

    @property
    def per_step(self) -> float:
        return self.seconds / self.steps if self.steps > 0 else 0.0


@dataclass
class Forecast:
    starts: dict[object, float | None] = field(default_factory=dict)  # waiting job -> seconds to start
    ends: dict[object, float | None] = field(default_factory=dict)  # every job -> seconds to its end
    next_free: float | None = 0.0  # seconds until a new job would start


def forecast(devices: Sequence[tuple[int, Sequence[Planned]]], waiting: Sequence[Planned]) -> Forecast:
    """Play the workers forward. ``devices`` is (slots, running jobs) per worker; ``waiting`` is the
    queue in service order. Once a job of unknown cost is met, every later time is unknown."""
    out = Forecast()
    active: list[list[_Slot]] = []
    slots: list[int] = []
    unknown = False
    for count, running in devices:
        slots.append(max(1, count))
        lane = []
        for job in running:
            if job.seconds is None or job.steps is None:
                unknown = True
                out.ends[job.key] = None
            else:
                lane.append(_Slot(job.key, job.seconds, max(1.0, job.steps)))
        active.append(lane)
    now = 0.0
    if not active:
        out.next_free = None
        for job in waiting:
            out.starts[job.key] = out.ends[job.key] = None
        return out

    def advance() -> None:
        """Run rounds until the first job ends somewhere; record its end."""
        nonlocal now
        best: float | None = None
        for lane in active:
            if lane:
                rounds = min(s.steps for s in lane)
                took = rounds * sum(s.per_step for s in lane)
                best = took if best is None else min(best, took)
        assert best is not None
        for lane in active:
            if not lane:
                continue
            round_time = sum(s.per_step for s in lane)
            rounds = best / round_time if round_time > 0 else float("inf")
            for s in list(lane):
                per_step = s.per_step
                s.steps -= rounds
                s.seconds = max(0.0, s.steps * per_step)
                if s.steps <= 1e-9:
                    lane.remove(s)
                    out.ends[s.key] = now + best
        now += best

    for job in waiting:
        if unknown or job.seconds is None or job.steps is None:
            unknown = True
            out.starts[job.key] = out.ends[job.key] = None
            continue
        while all(len(lane) >= n for lane, n in zip(active, slots, strict=True)):
            advance()
        free = next(i for i, lane in enumerate(active) if len(lane) < slots[i])
        out.starts[job.key] = now
        active[free].append(_Slot(job.key, job.seconds, max(1.0, job.steps)))
    if unknown:
        out.next_free = None
    else:
        while all(len(lane) >= n for lane, n in zip(active, slots, strict=True)):
            advance()
        out.next_free = now
    while any(active):
        advance()
    return out
