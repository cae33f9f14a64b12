"""A chat job submitted to an engine and watched from a test, and the watchdog driven fast.

Shared by the recovery suites (CPU twin and simulated pyaxcl card) and the resident-KV suite.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from npu.engine.api import ChatRequest, Delta, Done, Failed, JobEvent
from npu.engine.engine import Engine
from npu.llm.params import GenerationParams

GREEDY = GenerationParams(max_tokens=16, temperature=0)


class Job:
    """One chat request and every event its sink received, in order."""

    def __init__(self, engine: Engine, params: GenerationParams = GREEDY, text: str = "Name three colours.",
                 model: str | None = None) -> None:
        self.events: list[JobEvent] = []
        self.lock = threading.Lock()
        request = ChatRequest(messages=[{"role": "user", "content": text}], params=params, model=model)
        self.handle = engine.submit(request, self._sink)

    def _sink(self, event: JobEvent) -> None:
        with self.lock:
            self.events.append(event)

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))

    @property
    def final(self) -> Done | Failed:
        assert self.handle.wait(0), "the job has not ended"
        last = self.events[-1]
        assert isinstance(last, Done | Failed)
        return last

    def wait_for_text(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not self.streamed and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.streamed


def drive_watchdog(engine: Engine, until: Callable[[], bool], timeout: float = 60) -> None:
    """What the health job does every few seconds, faster."""
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        engine.check_watchdog()
        time.sleep(0.05)
    assert until(), "timed out"
