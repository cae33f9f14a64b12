"""What durable acceptance costs per request: the journal's three writes, with each sync mode.

admit (before the broker's acknowledgement) and replied (before the reply is published) are
synchronous; delivered runs on the network thread without an fsync. Prints microseconds per
request for ``sync: full`` and ``sync: normal`` on the folder given (default: a temporary folder
on the disk the state directory is on).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from appliance.journal import Journal, SyncMode
from handlers.acceptance import Accepted, Outgoing, request_digest


def one_request(journal: Journal, i: int) -> tuple[float, float, float]:
    payload = f'{{"id": "b{i}", "prompt": "Describe the room in one sentence.", "max_tokens": 60}}'.encode()
    request = Accepted("arduino-7", f"b{i}", f"b{i}", "chat", request_digest("chat", payload),
                       "appliance/request/chat/arduino-7", payload, None, None, None, 1, time.time())
    t0 = time.perf_counter()
    seq = journal.admit(request, redelivered=False).seq
    t1 = time.perf_counter()
    assert seq is not None
    journal.replied(seq, [Outgoing("replies/arduino-7/chat", b'{"id":"b%d","status":"ok"}' % i + b" " * 300),
                          Outgoing("replies/arduino-7/chat/text", b"x" * 200)])
    t2 = time.perf_counter()
    journal.delivered(seq)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the journal file")
    parser.add_argument("-n", type=int, default=500, help="requests per mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mode in ("full", "normal"):
            sync: SyncMode = mode  # type: ignore[assignment]
            journal = Journal(Path(tmp) / f"{mode}.sqlite3", sync=sync)
            times = [one_request(journal, i) for i in range(args.n)]
            journal.close()
            admit, replied, delivered = (statistics.median(t[k] for t in times) * 1e6 for k in range(3))
            total = sorted(sum(t) for t in times)
            p99 = total[int(len(total) * 0.99) - 1] * 1e6
            print(f"journal sync={mode}: admit {admit:.0f} us, replied {replied:.0f} us, "
                  f"delivered {delivered:.0f} us (medians); per request "
                  f"{admit + replied + delivered:.0f} us, p99 {p99:.0f} us")


if __name__ == "__main__":
    main()
