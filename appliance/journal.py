"""The acceptance journal: accepted requests and their replies in SQLite (WAL), so none is lost.

Why SQLite and not paho's manual acknowledgement alone: holding a request's PUBACK until it is
answered keeps it at the broker, but Mosquitto sends at most ``max_inflight_messages`` (20)
unacknowledged messages to a client, so the queue would stall behind long jobs, and a redelivery
would start the generation again from nothing. The journal lets the appliance acknowledge at once,
answer after a restart in the order the requests came, skip duplicates by id and payload, and
publish a reply again without generating it again. Python ships ``sqlite3``; a WAL database with
one transaction per step is crash-safe by SQLite's own guarantees (``synchronous=FULL`` also
survives a power cut; ``normal`` survives a crash of the process but may lose the last
transactions on power loss, at a fraction of the cost: docs/OPERATIONS.md has the figures).

Rows move ``accepted`` -> ``replied`` (the reply is stored) -> ``delivered`` (the broker has it).
Delivered rows are kept for ``window`` seconds so duplicates are recognised, then pruned.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from handlers.acceptance import Accepted, Admission, Outgoing, Seen

logger = logging.getLogger(__name__)

SyncMode = Literal["full", "normal"]
ACCEPTED, REPLIED, DELIVERED = 0, 1, 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY,
    sender TEXT,
    given_id TEXT,
    request_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    digest BLOB NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    response_topic TEXT,
    correlation_data BLOB,
    message_expiry INTEGER,
    qos INTEGER NOT NULL,
    received REAL NOT NULL,
    state INTEGER NOT NULL,
    done REAL,
    mid INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS requests_key ON requests (digest, sender, given_id);
CREATE INDEX IF NOT EXISTS requests_open ON requests (state, seq);
CREATE TABLE IF NOT EXISTS replies (
    seq INTEGER NOT NULL REFERENCES requests (seq) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    correlation_data BLOB,
    PRIMARY KEY (seq, n)
);
"""


@dataclass(frozen=True)
class Unanswered:
    """A journaled request with no reply yet: run it again."""

    seq: int
    request: Accepted


@dataclass(frozen=True)
class Undelivered:
    """A reply the broker never acknowledged: publish it again."""

    seq: int
    messages: tuple[Outgoing, ...]


class Journal:
    """One SQLite file; safe to call from any thread (one connection behind a lock).

    Args:
        path: the database file (its folder is created).
        sync: ``full`` (fsync every transaction) or ``normal``.
        window: seconds a delivered request is remembered, for duplicates.
        clock: wall-clock time (tests pass their own).
    """

    def __init__(self, path: Path, *, sync: SyncMode = "full", window: float = 600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.window = window
        self.clock = clock
        self._lock = threading.Lock()
        self._closing = False
        self._db = _open(self.path, sync)
        # Delivery marks only decide whether a reply is sent again after a crash: written without
        # an fsync (still safe against a crash of the process) so the network thread never waits.
        self._marks = _connect(self.path, "normal")
        self._last_prune = 0.0

    # the handlers' side (handlers.acceptance.JournalLike) -------------------------------------
    @property
    def closing(self) -> bool:
        """True once the appliance stops: requests refused because of the stop stay accepted."""
        return self._closing

    def admit(self, request: Accepted, *, redelivered: bool) -> Admission:
        """Journal ``request`` unless the same one was seen within the window (durable on return).

        A request without an id is only compared when the broker redelivered it: two visitors may
        well type the same words.
        """
        now = self.clock()
        with self._lock:
            if request.given_id is not None or redelivered:
                seen = self._find(request, now)
                if seen is not None:
                    return seen
            with self._db:
                cur = self._db.execute(
                    "INSERT INTO requests (sender, given_id, request_id, kind, digest, topic, payload,"
                    " response_topic, correlation_data, message_expiry, qos, received, mid, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (request.sender, request.given_id, request.request_id, request.kind,
                     request.digest, request.topic, request.payload, request.response_topic,
                     request.correlation_data, request.message_expiry, request.qos,
                     request.received, request.mid, ACCEPTED),
                )
            seq = int(cur.lastrowid or 0)
            if now - self._last_prune > 60:
                self._prune_locked(now)
        return Admission(Seen.NEW, seq=seq)

    def replied(self, seq: int, messages: Sequence[Outgoing]) -> None:
        """Store a final reply before it is published (durable on return)."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO replies (seq, n, topic, payload, correlation_data)"
                " VALUES (?, ?, ?, ?, ?)",
                [(seq, n, m.topic, m.payload, m.correlation_data) for n, m in enumerate(messages)],
            )
            self._db.execute("UPDATE requests SET state = ?, done = ? WHERE seq = ? AND state < ?",
                             (REPLIED, self.clock(), seq, REPLIED))

    def delivered(self, seq: int) -> None:
        """The broker acknowledged the reply (called on the network thread: no fsync)."""
        try:
            with self._lock, self._marks:
                self._marks.execute("UPDATE requests SET state = ? WHERE seq = ? AND state < ?",
                                    (DELIVERED, seq, DELIVERED))
        except sqlite3.Error:
            logger.exception("could not mark reply %d delivered (it may be sent again)", seq)

    # the application's side -------------------------------------------------------------------
    def unanswered(self) -> list[Unanswered]:
        """Requests accepted and not answered, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, sender, given_id, request_id, kind, digest, topic, payload,"
                " response_topic, correlation_data, message_expiry, qos, received, mid"
                " FROM requests WHERE state = ? ORDER BY seq", (ACCEPTED,)
            ).fetchall()
        return [Unanswered(r[0], Accepted(*r[1:])) for r in rows]

    def undelivered(self) -> list[Undelivered]:
        """Replies stored but never acknowledged by the broker, oldest first."""
        with self._lock:
            seqs = [r[0] for r in self._db.execute(
                "SELECT seq FROM requests WHERE state = ? ORDER BY seq", (REPLIED,)
            )]
            out = []
            for seq in seqs:
                msgs = self._db.execute(
                    "SELECT topic, payload, correlation_data FROM replies WHERE seq = ? ORDER BY n", (seq,)
                ).fetchall()
                out.append(Undelivered(seq, tuple(Outgoing(t, bytes(p), c) for t, p, c in msgs)))
        return out

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = dict(self._db.execute("SELECT state, COUNT(*) FROM requests GROUP BY state").fetchall())
        return {"accepted": rows.get(ACCEPTED, 0), "replied": rows.get(REPLIED, 0),
                "delivered": rows.get(DELIVERED, 0)}

    def begin_stop(self) -> None:
        """From now on a request refused because the appliance stops stays accepted."""
        self._closing = True

    def close(self) -> None:
        self._closing = True
        with self._lock:
            self._marks.close()
            self._db.close()

    # internals --------------------------------------------------------------------------------
    def _find(self, request: Accepted, now: float) -> Admission | None:
        # Without an id, only the broker's second copy of one message is the same request: it
        # keeps its packet id, and two visitors typing the same words do not share one.
        same_packet = " AND mid = ?" if request.given_id is None else ""
        row = self._db.execute(
            "SELECT seq, state FROM requests WHERE digest = ? AND sender IS ? AND given_id IS ?"
            f" AND (state < ? OR done >= ?){same_packet} ORDER BY seq DESC LIMIT 1",
            (request.digest, request.sender, request.given_id, DELIVERED, now - self.window,
             *((request.mid,) if request.given_id is None else ())),
        ).fetchone()
        if row is None:
            return None
        seq, state = row
        if state == ACCEPTED:
            return Admission(Seen.PENDING, seq=seq)
        msgs = self._db.execute(
            "SELECT topic, payload, correlation_data FROM replies WHERE seq = ? ORDER BY n", (seq,)
        ).fetchall()
        return Admission(Seen.ANSWERED, seq=seq,
                         reply=tuple(Outgoing(t, bytes(p), c) for t, p, c in msgs))

    def _prune_locked(self, now: float) -> None:
        with self._db:
            self._db.execute("DELETE FROM replies WHERE seq IN (SELECT seq FROM requests"
                             " WHERE state = ? AND done < ?)", (DELIVERED, now - self.window))
            self._db.execute("DELETE FROM requests WHERE state = ? AND done < ?",
                             (DELIVERED, now - self.window))
        self._last_prune = now


def _open(path: Path, sync: SyncMode) -> sqlite3.Connection:
    """Open (or create) the journal; a damaged file is set aside so the appliance still starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _connect(path, sync)
    except sqlite3.DatabaseError as exc:
        aside = path.with_name(f"{path.name}.damaged-{int(time.time())}")
        logger.error("the journal %s is damaged (%s); set aside as %s, starting a new one",
                     path, exc, aside.name)
        for suffix in ("", "-wal", "-shm"):
            part = Path(f"{path}{suffix}")
            if part.exists():
                part.rename(Path(f"{aside}{suffix}"))
        return _connect(path, sync)


def _connect(path: Path, sync: SyncMode) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(_SCHEMA)
        columns = {row[1] for row in db.execute("PRAGMA table_info(requests)")}
        if "mid" not in columns:  # a journal written before packet ids were kept
            db.execute("ALTER TABLE requests ADD COLUMN mid INTEGER NOT NULL DEFAULT 0")
        db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError:
        db.close()
        raise
    db.isolation_level = ""  # ``with db:`` is one transaction
    return db
