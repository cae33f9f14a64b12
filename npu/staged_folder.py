"""Replacing a bundle folder in one rename, so a running appliance never sees half a bundle.

What writes a bundle (the model fetcher, the converter) fills a sibling folder and swaps it in only
once it is complete; a failure, or a kill, leaves the old bundle as it was.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STALE_SECONDS = 24 * 3600  # a staging folder this old was left by a run that was killed


@contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """An empty sibling of ``dest`` to fill; it takes ``dest``'s place when the block ends without
    an error, and is removed when it raises.

    Each run stages in a folder of its own (``.<name>.<random>.partial``), so two writers of the
    same bundle never write into each other's files; the last to finish wins.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    for left in dest.parent.glob(f".{dest.name}.*.partial"):
        if time.time() - left.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(left, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the service user must read the bundle
    try:
        yield staging
        swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in(staging: Path, dest: Path) -> None:
    """Put ``staging`` at ``dest``: the old folder is moved aside first and removed after."""
    old = dest.with_name(f".{dest.name}.old-{time.time_ns()}")
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
