"""Per-sender limits: how many jobs one sender may have waiting, and how many it may send a minute.

A sender over its limit is refused ``rate_limited`` with a retry hint; nobody else notices. The
rules come from ``EngineConfig.senders`` (a name or a glob such as ``sensor-*``, first match
wins) and ``EngineConfig.sender_limits`` for everyone else. The per-minute count is a moving
window kept by the ``limits`` package (its in-memory storage), not hand-written bookkeeping.

Counted per sender: requests accepted and refusals by code, for ``/metrics``
(``appliance_sender_requests_total``, ``appliance_sender_rejected_total``, and the live
``appliance_sender_waiting``) and the telemetry's ``senders``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from npu.engine.api import EngineError, ErrorCode
from npu.engine.config import SenderLimits

PREFIX = "appliance"
MAX_COUNTED = 500  # senders counted by name; more (HTTP addresses without end) are counted as "other"
OTHER = "other"


@dataclass
class SenderCounts:
    requests: int = 0  # accepted
    rejected: dict[str, int] = field(default_factory=dict)  # by error code


class SenderGate:
    """Checks a sender's limits before its job is queued; not thread-safe (the engine's lock)."""

    def __init__(self, default: SenderLimits, rules: Mapping[str, SenderLimits],
                 registry: CollectorRegistry, waiting: Callable[[], dict[str, int]]) -> None:
        self.default = default
        self.rules = dict(rules)
        self._window = MovingWindowRateLimiter(MemoryStorage())
        self._items = {n: RateLimitItemPerMinute(n) for n in {
            r.per_minute for r in [default, *self.rules.values()] if r.per_minute}}
        self.counts: dict[str, SenderCounts] = {}
        self._requests = Counter(f"{PREFIX}_sender_requests", "Jobs accepted, by sender", ("sender",),
                                 registry=registry)
        self._rejected = Counter(f"{PREFIX}_sender_rejected", "Jobs refused at submission, by sender "
                                 "and error code (rate_limited: over its own limit)", ("sender", "code"),
                                 registry=registry)
        registry.register(_WaitingCollector(waiting))

    def limits_of(self, sender: str) -> SenderLimits:
        exact = self.rules.get(sender)
        if exact is not None:
            return exact
        return next((r for pattern, r in self.rules.items() if fnmatchcase(sender, pattern)), self.default)

    def check(self, sender: str, waiting: int, per_job: float = 2.0) -> None:
        """Raise ``rate_limited`` when this sender may not queue one more job now; ``per_job`` is
        the engine's estimate of when a waiting job starts, the hint for a full lane."""
        rule = self.limits_of(sender)
        if rule.max_queued is not None and waiting >= rule.max_queued:
            raise EngineError(ErrorCode.RATE_LIMITED, (
                f"sender {sender!r} already has {waiting} request(s) waiting, its limit; retry once "
                "one is answered"), retry_after=per_job,
                details={"sender": sender, "max_queued": rule.max_queued})
        if rule.per_minute:
            item = self._items[rule.per_minute]
            if not self._window.test(item, sender):
                reset, _ = self._window.get_window_stats(item, sender)
                retry = round(max(1.0, reset - time.time()), 1)
                raise EngineError(ErrorCode.RATE_LIMITED, (
                    f"sender {sender!r} sent {rule.per_minute} requests in the last minute, its limit; "
                    f"retry in {retry:g} s"), retry_after=retry,
                    details={"sender": sender, "per_minute": rule.per_minute})

    def accepted(self, sender: str) -> None:
        rule = self.limits_of(sender)
        if rule.per_minute:
            self._window.hit(self._items[rule.per_minute], sender)
        name = self._counted(sender)
        self.counts.setdefault(name, SenderCounts()).requests += 1
        self._requests.labels(name).inc()

    def rejected(self, sender: str, code: str) -> None:
        name = self._counted(sender)
        counts = self.counts.setdefault(name, SenderCounts())
        counts.rejected[code] = counts.rejected.get(code, 0) + 1
        self._rejected.labels(name, code).inc()

    def _counted(self, sender: str) -> str:
        """The name a sender is counted under: its own, until ``MAX_COUNTED`` names are in use, so
        clients that change address cannot grow the counters (and /metrics) without bound."""
        return sender if sender in self.counts or len(self.counts) < MAX_COUNTED else OTHER


class _WaitingCollector(Collector):
    """``appliance_sender_waiting{sender}``, read from the queue at scrape time."""

    def __init__(self, waiting: Callable[[], dict[str, int]]) -> None:
        self._waiting = waiting

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(f"{PREFIX}_sender_waiting", "Jobs waiting, by sender", labels=["sender"])
        for sender, count in sorted(self._waiting().items()):
            family.add_metric([sender], count)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(f"{PREFIX}_sender_waiting", "Jobs waiting, by sender", labels=["sender"])
