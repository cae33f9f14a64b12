"""The acceptance journal and the dispatcher's use of it: durable, deduplicated, kept across a stop."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from test_handlers_unit import BASE, Msg, Recorder, StubEngine

from appliance.journal import Journal
from appliance.topics import Topics
from handlers.acceptance import Accepted, Outgoing, Seen, request_digest
from handlers.context import HandlerContext, Limits
from handlers.registry import Dispatcher
from handlers.reply import Reply, Route


def accepted(rid: str | None = "a1", payload: bytes = b'{"id":"a1","prompt":"hi"}', sender: str | None = "s",
             received: float = 1000.0) -> Accepted:
    return Accepted(sender, rid, rid or "chat-x", "chat", request_digest("chat", payload), "b/request/chat/s",
                    payload, None, None, None, 1, received)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_request_goes_accepted_replied_delivered(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", clock=Clock())
    admission = journal.admit(accepted(), redelivered=False)
    assert admission.seen is Seen.NEW and admission.seq is not None
    assert [u.request.request_id for u in journal.unanswered()] == ["a1"]
    reply = (Outgoing("replies/s/chat", b'{"id":"a1"}'), Outgoing("replies/s/chat/text", b"hello"))
    journal.replied(admission.seq, reply)
    assert journal.unanswered() == [] and journal.undelivered()[0].messages == reply
    journal.delivered(admission.seq)
    assert journal.undelivered() == [] and journal.counts() == {"accepted": 0, "replied": 0, "delivered": 1}
    journal.close()


def test_what_a_killed_process_journaled_is_there_after_the_restart(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_journal import accepted
from appliance.journal import Journal
from handlers.acceptance import Outgoing
j = Journal({str(path)!r})
a = j.admit(accepted("a1"), redelivered=False)
b = j.admit(accepted("b2", b'{{"id":"b2"}}'), redelivered=False)
j.replied(b.seq, [Outgoing("replies/s/chat", b"reply-b2")])
os._exit(9)  # no close, no flush: as kill -9 leaves it
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 9, done.stderr
    journal = Journal(path)
    assert [u.request.given_id for u in journal.unanswered()] == ["a1"]
    assert [u.messages[0].payload for u in journal.undelivered()] == [b"reply-b2"]
    journal.close()


def test_duplicates_within_the_window_are_recognised(tmp_path: Path) -> None:
    clock = Clock()
    journal = Journal(tmp_path / "j.sqlite3", clock=clock, window=600)
    first = journal.admit(accepted(), redelivered=False)
    assert journal.admit(accepted(), redelivered=False).seen is Seen.PENDING
    assert first.seq is not None
    journal.replied(first.seq, [Outgoing("replies/s/chat", b"r")])
    journal.delivered(first.seq)
    again = journal.admit(accepted(), redelivered=True)
    assert again.seen is Seen.ANSWERED and again.reply == (Outgoing("replies/s/chat", b"r"),)
    # Another sender, or the same id with other words, is another request.
    assert journal.admit(accepted(sender="t"), redelivered=False).seen is Seen.NEW
    assert journal.admit(accepted(payload=b'{"id":"a1","prompt":"bye"}'), redelivered=False).seen is Seen.NEW
    # Past the window the row is pruned and the id is new again.
    clock.now += 601
    assert journal.admit(accepted(), redelivered=False).seen is Seen.NEW
    journal.close()


def test_requests_without_an_id_are_only_compared_when_redelivered(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3", clock=Clock())
    first, second = (replace(accepted(rid=None, payload=b"Hello!"), mid=m) for m in (7, 8))
    assert journal.admit(first, redelivered=False).seen is Seen.NEW
    assert journal.admit(second, redelivered=False).seen is Seen.NEW  # two visitors, same words
    assert journal.admit(first, redelivered=True).seen is Seen.PENDING  # the broker's second copy
    # A redelivery of a message the journal never saw (lost in a crash) is new, even when
    # someone else sent the same words before.
    assert journal.admit(replace(first, mid=9), redelivered=True).seen is Seen.NEW
    journal.close()


def test_a_damaged_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    journal = Journal(path)
    assert journal.admit(accepted(), redelivered=False).seen is Seen.NEW
    journal.close()
    assert list(tmp_path.glob("j.sqlite3.damaged-*"))


def make(tmp_path: Path, mode: str = "sync_done") -> tuple[Dispatcher, StubEngine, Recorder, Journal]:
    engine, rec = StubEngine(mode), Recorder()
    journal = Journal(tmp_path / "j.sqlite3")
    ctx = HandlerContext(engine, rec, Topics(BASE), Limits(max_payload=4096), journal=journal)  # type: ignore[arg-type]
    return Dispatcher(None, ctx), engine, rec, journal  # type: ignore[arg-type]


@dataclass(frozen=True)
class Delivery(Msg):
    """A message as the link hands it over: with the broker's DUP flag."""

    dup: bool = False


def ask(disp: Dispatcher, body: dict[str, Any], dup: bool = False, sender: str = "s") -> Any:
    return disp.handle(Delivery(f"{BASE}/request/chat/{sender}", json.dumps(body).encode(), dup=dup))


def test_the_dispatcher_runs_a_request_once_and_answers_a_resend_from_the_journal(tmp_path: Path) -> None:
    disp, engine, rec, journal = make(tmp_path)
    body = {"id": "q1", "prompt": "hi"}
    ask(disp, body)
    rec.wait_finals(1)
    assert len(engine.submitted) == 1
    assert rec.finals()[0][0] == "replies/s/chat"
    ask(disp, body, dup=True)  # the broker's redelivery: nothing, its reply went out already
    time.sleep(0.05)
    assert len(engine.submitted) == 1 and len(rec.finals()) == 1
    ask(disp, body)  # the caller asked again: the stored reply, no second generation
    rec.wait_finals(2)
    assert len(engine.submitted) == 1
    assert rec.finals()[1][1] == rec.finals()[0][1]
    journal.close()


def test_a_request_refused_by_the_stop_stays_accepted_for_the_next_start(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite3")
    admission = journal.admit(accepted(), redelivered=False)
    assert admission.seq is not None
    rec = Recorder()
    reply = Reply(rec, Route("replies/s/chat"), "a1", text_copy=True)
    reply.bind(journal, admission.seq)
    journal.begin_stop()
    assert reply.error("unavailable", "the appliance is stopping") is False
    assert rec.items == [] and [u.request.given_id for u in journal.unanswered()] == ["a1"]
    # Any other outcome during the stop is an answer like any other.
    other = journal.admit(accepted("b2", b'{"id":"b2"}'), redelivered=False)
    assert other.seq is not None
    done = Reply(rec, Route("replies/s/chat"), "b2")
    done.bind(journal, other.seq)
    assert done.ok({"text": "hi"})
    assert [u.request.given_id for u in journal.unanswered()] == ["a1"]
    journal.close()
