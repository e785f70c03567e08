"""Handing memory that jobs freed back to the system, without paying for it on every request.

glibc keeps freed blocks in its arenas (below its mmap threshold, which grows up to 32 MiB), so
a large request would leave the process's resident size raised for good; malloc_trim gives
them back. Trimming after every job was measured to cost more than the parse of a small request
(`make bench-http`, 128 x 64 nested lists: about 0.8 ms of 3.3 ms per request, and 0.4 of
1.0 ms for b64): a steady stream of requests keeps a few MiB of free blocks that each trim
handed back and the next request faulted in again page by page. So a job trims only when the
arenas' free bytes have grown by more than TRIM_GROWTH since the last trim: what a large
request freed is still given back at once, a steady working set is kept. Blocks that a later
job re-uses from space already trimmed do not show as growth, so a job also trims when the last
trim is more than TRIM_EVERY_S old: a few trims a second at most, whatever the traffic.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable

# Free memory a job may leave in the arenas beyond what was free after the last trim. Small
# next to the 50 MiB test_hostile allows over its passes and the 16 MiB after a heavy request.
TRIM_GROWTH = 8 << 20
TRIM_EVERY_S = 1.0


class _MallInfo2(ctypes.Structure):
    # glibc >= 2.33; fields in the order of struct mallinfo2 (malloc.h).
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _load() -> tuple[Callable[[int], int] | None, Callable[[], _MallInfo2] | None]:
    """(malloc_trim, mallinfo2), each None where the C library lacks it (not glibc, or older)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None, None
    trim = getattr(libc, "malloc_trim", None)
    info = getattr(libc, "mallinfo2", None)
    if info is not None:
        info.restype = _MallInfo2
        info.argtypes = []
    return trim, info


_MALLOC_TRIM, _MALLINFO2 = _load()
_lock = threading.Lock()
_free_after_trim = 0  # the arenas' free bytes right after the last trim
_last_trim = 0.0  # time.monotonic() of the last trim


def free_bytes() -> int | None:
    """Bytes free in malloc's arenas (resident or already trimmed), or None if unknown."""
    return None if _MALLINFO2 is None else int(_MALLINFO2().fordblks)


def release_memory() -> None:
    """Trim malloc's arenas if jobs freed more than TRIM_GROWTH since the last trim or that
    trim is over TRIM_EVERY_S old (always trim where free bytes cannot be known)."""
    global _free_after_trim, _last_trim
    if _MALLOC_TRIM is None:
        return
    free = free_bytes()
    if free is None:
        _MALLOC_TRIM(0)
        return
    with _lock:
        now = time.monotonic()
        if free - _free_after_trim <= TRIM_GROWTH and now - _last_trim <= TRIM_EVERY_S:
            # Free bytes below the mark (blocks reused since): lower the mark, so growth counts
            # from what is free now.
            _free_after_trim = min(_free_after_trim, free)
            return
        _MALLOC_TRIM(0)
        _free_after_trim, _last_trim = free_bytes() or 0, now
