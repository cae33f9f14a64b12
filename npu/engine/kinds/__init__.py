"""Job kinds: what the engine does differently for a chat, an image, and whatever comes next.

The engine and its workers drive every kind through ``JobKind`` and never ask which one they
hold. A kind is one module of this package that defines ``KIND``, named as the module is (the
config's ``models[].kind`` accepts every module name here), so adding one (speech, embeddings) is
that module, its request and result types in ``npu.engine.api``, and the front-door handlers that
build the request.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from npu.engine.api import Done, EngineError, Failed, JobEvent, Request
from npu.engine.config import ModelSpec
from npu.engine.job import WorkerJob
from npu.engine.metrics import EngineMetrics


class Runner(Protocol):
    """A resident model on one device, as the worker holds it."""

    backend: str

    def close(self) -> None: ...


@dataclass(frozen=True)
class ModelFacts:
    """What ``models()`` shows of a loaded model beyond its id and backend."""

    context_length: int | None = None
    max_prompt_tokens: int | None = None
    sizes: list[str] | None = None
    steps: list[int] | None = None
    sample_rate: int | None = None
    languages: list[str] | None = None


@dataclass(frozen=True)
class StepOutcome:
    """What one step of a job came to: events to send, and maybe its end.

    ``end`` answers the job now; ``later`` is host work (an image's encoding) that answers it off
    the device's thread, so the device takes the next job's step meanwhile.
    """

    events: tuple[JobEvent, ...] = ()
    end: Done | Failed | None = None
    later: Callable[[], Done | Failed] | None = None


class JobKind(Protocol):
    name: str  # what ``ModelSpec.kind`` and ``ModelInfo.kind`` say
    request_type: type[Any]  # the request of ``npu.engine.api`` this kind runs

    def load(self, spec: ModelSpec, device_id: int, cache_slots: int) -> Runner:
        """Load the model onto the device."""
        ...

    def facts(self, runner: Any) -> ModelFacts: ...

    def model_not_found(self, requested: str | None, available: list[str]) -> EngineError: ...

    def admit(self, request: Any, runner: Any) -> tuple[Request, Any]:
        """Check a request against its model on the caller's thread (raise ``EngineError``), and
        return the request to queue (its seed drawn, so a retry repeats it) and the job's state."""
        ...

    def steps(self, job: WorkerJob, runner: Any) -> Iterator[Any]:
        """The job's steps: each ``next`` is one unit of device work."""
        ...

    def advance(self, job: WorkerJob, step: Any, now: float, metrics: EngineMetrics) -> StepOutcome:
        """Turn what a step yielded into events, and the job's end once it has one."""
        ...

    def failure(self, exc: Exception) -> EngineError | None:
        """The typed error of a step failure this kind knows (None: the worker's generic answer)."""
        ...

    def retry(self, job: WorkerJob) -> None:
        """Prepare a job that ran when its device was reset to run again from the start."""
        ...

    def record(self, metrics: EngineMetrics, model_id: str, done: Done) -> None:
        """Feed the metrics of a job that succeeded."""
        ...


def kind_names() -> tuple[str, ...]:
    """Every kind's name, read from the module names (nothing is imported: the config asks early)."""
    return tuple(sorted(module.name for module in pkgutil.iter_modules(__path__)))


@cache
def all_kinds() -> dict[str, JobKind]:
    """Every kind of this package, by name."""
    found: dict[str, JobKind] = {}
    for name in kind_names():
        kind: JobKind = importlib.import_module(f"{__name__}.{name}").KIND
        if kind.name != name:
            raise RuntimeError(f"the job kind of {__name__}.{name} is named {kind.name!r}, not {name!r}")
        found[name] = kind
    return found


def kind_for_request(request: Request) -> JobKind | None:
    return next((k for k in all_kinds().values() if type(request) is k.request_type), None)
