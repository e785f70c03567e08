"""Rate limiters: one interface, a budget per caller; where the budgets live is the state store's
choice (service.web.store): in this process (LocalRateLimiter, the file store's), or in Redis,
one budget per caller across every replica (the Redis store's GCRA limiter).

Both implement the same token bucket: `capacity` requests at once, refilled at `per_minute`
per minute; `acquire` answers 0.0 (allowed, one token taken) or the seconds until a token is
available.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class RateLimiter(Protocol):
    per_minute: int
    remote: bool  # acquire makes a round trip (call it off the event loop)

    def acquire(self, caller: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available."""
        ...


def capacity(per_minute: int, burst: int) -> float:
    """Requests a caller may make at once: the burst, or a minute's worth."""
    return float(burst or per_minute)


class LocalRateLimiter:
    """A token bucket per caller, in this process only.

    Idle callers' buckets (full again) are dropped once more than `max_callers` are tracked, so
    many distinct clients cannot grow the table without bound.
    """

    remote = False

    def __init__(
        self,
        per_minute: int,
        burst: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 10_000,
    ) -> None:
        self.per_minute = per_minute
        self.capacity = capacity(per_minute, burst)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(caller, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self._rate)
            if tokens >= 1.0:
                self._buckets[caller] = (tokens - 1.0, now)
                if len(self._buckets) > self._max_callers:
                    self._prune(now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self._rate

    def _prune(self, now: float) -> None:
        full_after = self.capacity / self._rate
        for caller, (_, at) in list(self._buckets.items()):
            if now - at >= full_after:
                del self._buckets[caller]
        # Still too many busy callers: forget the longest idle (they get a full bucket back).
        if len(self._buckets) > self._max_callers:
            by_age = sorted(self._buckets, key=lambda c: self._buckets[c][1])
            for caller in by_age[: len(self._buckets) - self._max_callers]:
                del self._buckets[caller]
