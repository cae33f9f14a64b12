"""Give freed memory back to the system after models are unloaded.

Model weights are allocated by several threads, so glibc spreads them over several malloc arenas
and keeps the freed pages: without a trim, every reload or recovery of the CPU twin would leave
about half a gigabyte behind in an appliance that runs for weeks. ``malloc_trim`` returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

logger = logging.getLogger(__name__)

_libc: ctypes.CDLL | None = None
_looked = False


def _glibc() -> ctypes.CDLL | None:
    global _libc, _looked
    if not _looked:
        _looked = True
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _libc = libc if libc is not None and hasattr(libc, "malloc_trim") else None
        except OSError:
            _libc = None
    return _libc


def release_freed_memory() -> bool:
    """Collect garbage and trim the C heap; ``False`` where the C library has no ``malloc_trim``."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
