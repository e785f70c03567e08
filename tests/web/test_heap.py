"""Freed memory goes back to the system after a job that freed much, and only then.

Resident size is read from /proc (the kernel's count, independent of malloc's own figures).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from service.web import heap

MiB = 1 << 20
pytestmark = pytest.mark.skipif(
    heap.free_bytes() is None or heap._MALLOC_TRIM is None, reason="needs glibc >= 2.33"
)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _count_trims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    trims: list[int] = []
    real = heap._MALLOC_TRIM
    assert real is not None

    def trim(pad: int) -> int:
        trims.append(pad)
        return real(pad)

    monkeypatch.setattr(heap, "_MALLOC_TRIM", trim)
    return trims


def test_a_job_that_freed_much_hands_it_back(monkeypatch: pytest.MonkeyPatch) -> None:
    trims = _count_trims(monkeypatch)
    heap.release_memory()  # a fresh mark
    monkeypatch.setattr(heap, "_last_trim", time.monotonic())  # only growth may trigger now
    trims.clear()
    # 48 MiB in blocks malloc serves from its heap (above pymalloc's 512 bytes, below the mmap
    # threshold), with one block kept after them so that freeing them leaves a hole in the heap
    # that glibc's automatic trimming of the heap's top would not return.
    blocks = [bytes(1024) for _ in range(48 * 1024)]
    keeper = bytes(1024)
    # The mark as if the last trim came now: a heap that already held free blocks (earlier
    # tests) served some of these from them, which counts as no growth.
    monkeypatch.setattr(heap, "_free_after_trim", heap.free_bytes())
    before = _rss()
    del blocks
    assert _rss() > before - 16 * MiB  # still resident: glibc kept the hole
    heap.release_memory()
    assert len(trims) == 1
    assert _rss() < before - 32 * MiB, "the freed 48 MiB stayed resident"
    del keeper


def test_a_steady_stream_of_small_jobs_does_not_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    trims = _count_trims(monkeypatch)
    heap.release_memory()
    monkeypatch.setattr(heap, "_last_trim", time.monotonic())
    trims.clear()
    for _ in range(200):
        work = [bytes(1024) for _ in range(512)]  # 0.5 MiB allocated and freed per "job"
        del work
        heap.release_memory()
    assert trims == []
    # ...until the last trim is TRIM_EVERY_S old.
    monkeypatch.setattr(heap, "_last_trim", time.monotonic() - heap.TRIM_EVERY_S - 0.1)
    heap.release_memory()
    assert len(trims) == 1
