"""Replacing a bundle folder in one rename, so a running appliance never sees half a bundle.

What writes a bundle (the model fetcher, the converter) fills a sibling folder and swaps it in only
once it is complete; a failure, or a kill, leaves the old bundle as it was.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(dest: Path) -> Iterator[Path]:
    """An empty sibling of ``dest`` to fill; it takes ``dest``'s place when the block ends without
    an error, and is removed when it raises."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir()
    try:
        yield staging
        swap_in(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in(staging: Path, dest: Path) -> None:
    """Put ``staging`` at ``dest``: the old folder is moved aside first and removed after."""
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
