"""The scheduler every HTTP front shares: bounded concurrency, a bounded queue, worker threads.

Admission control, not computation: the jobs it runs call the compute core (service.core).

At most `max_concurrency` jobs run at once, each in a worker thread so the event loop never
blocks; up to `queue_size` more wait; beyond that `run` raises Overloaded (503 + Retry-After)
at once instead of letting work pile up.

A route may let small requests skip the thread hop (run_request(..., inline=True)): a body of
at most `inline_max_bytes` (ATTN_INLINE_MAX_BYTES) is parsed on the event loop, and the job
itself decides whether its work is small enough to finish there (a few hundred microseconds at
most: see jobs.fits_inline) or hands the rest to a worker by returning Deferred. Measured with
`make bench-http` (both servers side by side): a 128 x 64 b64 attention costs 0.8-0.9 ms of
server CPU inline against 0.9-1.3 ms through a worker (submit, wake-up, future, disconnect
watcher, GIL hand-overs); a body of nested lists (500 kB for 128 x 64) parses no cheaper on the
event loop and holds it for milliseconds, hence the default bound of 256 KiB. Such a request
never waits in the queue; one it admits is still refused (503) while the queue is full.

A job nobody waits for any more is abandoned: when its client disconnects (499) or it has spent
`timeout_s` in the scheduler, queued or running (504). A queued job is taken off the queue and never
runs; a running one is told through its CancelToken and stops at its next checkpoint (a native
call in progress finishes first). Its slot stays taken until its thread is really free, so the
admission counts never promise cores that are busy.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from starlette.requests import Request
from starlette.types import Receive

from service.core.cancel import Cancelled, CancelToken, bound
from service.web.heap import release_memory
from service.web.problems import ClientClosed, ComputeTimeout, Overloaded

T = TypeVar("T")


class Deferred:
    """What an inline job returns when the rest of its work is too large for the event loop:
    `fn()` finishes it in a worker thread."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn


def _finish(result: Any) -> Any:
    """A job's answer: its result, or (Deferred) what the rest of its work returns."""
    return result.fn() if isinstance(result, Deferred) else result


class SchedulerObserver(Protocol):
    """What the scheduler reports (service.web.metrics.Metrics implements it)."""

    def observe_compute(self, job: str, seconds: float) -> None: ...

    def observe_rejected(self, job: str) -> None: ...

    def observe_abandoned(self, job: str, reason: str) -> None: ...


class Scheduler:
    """Admission control in front of a thread pool of `max_concurrency` workers."""

    def __init__(
        self,
        max_concurrency: int,
        queue_size: int,
        retry_after_s: int = 1,
        observer: SchedulerObserver | None = None,
        timeout_s: float = 0,
        inline_max_bytes: int = 0,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.queue_size = queue_size
        self.timeout_s = timeout_s  # 0: no limit
        self.inline_max_bytes = inline_max_bytes  # 0: never inline
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

    async def run(
        self,
        job: str,
        fn: Callable[..., T],
        *args: Any,
        receive: Receive | None = None,
        timeout_s: float | None = None,
    ) -> T:
        """Run fn(*args) in a worker thread, or raise Overloaded if the queue is full.

        `receive` (the request's ASGI receive, its body already read) is watched for the
        client's disconnect (ClientClosed); `timeout_s` (default: the scheduler's; 0 or inf: none)
        bounds the time queued plus running (ComputeTimeout).
        """
        with self._lock:
            full = self._admitted >= self._capacity
            if not full:
                self._admitted += 1
        if full:
            raise self._overloaded(job)
        token = CancelToken()
        try:
            future = self._executor.submit(self._timed, job, token, fn, *args)
        except RuntimeError:  # executor shut down
            self._release(None)
            raise
        future.add_done_callback(self._release)
        result = asyncio.wrap_future(future)
        limit = self.timeout_s if timeout_s is None else timeout_s
        watcher = asyncio.ensure_future(_disconnected(receive)) if receive else None
        waiting: set[asyncio.Future[Any]] = {result} if watcher is None else {result, watcher}
        reason = "cancelled"
        try:
            done, _ = await asyncio.wait(
                waiting,
                timeout=limit if 0 < limit < math.inf else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if result in done:
                return result.result()
            reason = "disconnect" if done else "timeout"
        finally:
            if watcher is not None:
                watcher.cancel()
            if not result.done():  # abandoned: disconnect, timeout, or this task cancelled
                token.cancel(reason)
                future.cancel()  # a queued job leaves the queue now (never runs)
                result.cancel()
                if self._observer:
                    self._observer.observe_abandoned(job, reason)
        if reason == "disconnect":
            raise ClientClosed("the client closed the connection before the answer was ready")
        raise ComputeTimeout(
            f"the computation did not finish within {limit:g} s (ATTN_REQUEST_TIMEOUT_S); "
            "ask for less work or retry later"
        )

    async def run_request(
        self, job: str, request: Request, fn: Callable[..., Any], *args: Any, inline: bool = False
    ) -> Any:
        """A route's whole job: admit it, read the request body, then run fn(*args, body) in a
        worker, watching for the client's disconnect while it waits or runs.

        inline: fn may run on the event loop for a body of at most inline_max_bytes; it then
        either answers (small work) or returns Deferred, whose rest runs in a worker."""
        self.raise_if_full(job)
        body = await request.body()
        if inline and len(body) <= self.inline_max_bytes:
            result = self._timed(job, CancelToken(), fn, *args, body)
            if not isinstance(result, Deferred):
                return result
            return await self.run(job, result.fn, receive=request.receive)
        return await self.run(job, _compose(fn), *args, body, receive=request.receive)

    def _timed(self, job: str, token: CancelToken, fn: Callable[..., T], *args: Any) -> T:
        if token.cancelled:  # abandoned between leaving the queue and starting
            raise Cancelled(token.reason)
        with self._lock:
            self._running += 1
        start = time.perf_counter()
        try:
            with bound(token):
                return fn(*args)
        finally:
            release_memory()
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


def _compose(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, with a Deferred answer finished in the same (worker) thread."""

    def whole(*args: Any) -> Any:
        return _finish(fn(*args))

    return whole


async def _disconnected(receive: Receive) -> None:
    """Return once the client has gone (the body has been read, so nothing else arrives)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a broken connection is a gone client too
        return
