"""The compute core every HTTP front shares: bounded concurrency, a bounded queue, worker threads.

At most `max_concurrency` jobs run at once, each in a worker thread so the event loop never
blocks; up to `queue_size` more wait; beyond that `run` raises Overloaded (503 + Retry-After)
at once instead of letting work pile up.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from service.problems import Overloaded

T = TypeVar("T")


class ComputeObserver(Protocol):
    """What the core reports (service.metrics.Metrics implements it)."""

    def observe_compute(self, job: str, seconds: float) -> None: ...

    def observe_rejected(self, job: str) -> None: ...


class ComputeCore:
    """Admission control in front of a thread pool of `max_concurrency` workers."""

    def __init__(
        self,
        max_concurrency: int,
        queue_size: int,
        retry_after_s: int = 1,
        observer: ComputeObserver | None = None,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self._capacity = max_concurrency + queue_size
        self._retry_after = str(retry_after_s)
        self._observer = observer
        self._executor = ThreadPoolExecutor(max_concurrency, thread_name_prefix="attn-compute")
        # Counters are changed from the event loop (admit) and from workers (release).
        self._lock = threading.Lock()
        self._admitted = 0
        self._running = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def queued(self) -> int:
        return max(0, self._admitted - self._running)

    def _overloaded(self, job: str) -> Overloaded:
        if self._observer:
            self._observer.observe_rejected(job)
        return Overloaded(
            f"{self._running} computations are running and {self.queued} are waiting "
            f"(ATTN_MAX_CONCURRENCY={self.max_concurrency}, ATTN_QUEUE_SIZE="
            f"{self.queue_size}); retry later",
            headers={"Retry-After": self._retry_after},
        )

    def raise_if_full(self, job: str) -> None:
        """Refuse at once, before a route spends time reading a body it could not queue."""
        if self._admitted >= self._capacity:
            raise self._overloaded(job)

    async def run(self, job: str, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a worker thread, or raise Overloaded if the queue is full."""
        with self._lock:
            full = self._admitted >= self._capacity
            if not full:
                self._admitted += 1
        if full:
            raise self._overloaded(job)
        try:
            future = self._executor.submit(self._timed, job, fn, *args)
        except RuntimeError:  # executor shut down
            self._release(None)
            raise
        future.add_done_callback(self._release)
        # If the awaiting request is cancelled, wrap_future cancels a job still in the queue.
        return await asyncio.wrap_future(future)

    def _timed(self, job: str, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            self._running += 1
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._running -= 1
            if self._observer:
                self._observer.observe_compute(job, elapsed)

    def _release(self, _future: Future[Any] | None) -> None:
        with self._lock:
            self._admitted -= 1

    def close(self) -> None:
        """Stop accepting work; jobs still queued are cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)
