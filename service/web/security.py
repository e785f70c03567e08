"""Who may call /v1 and /v2: optional API keys (Bearer) and an optional per-caller rate limit.

`service.web.deps.authorize` is the FastAPI dependency built on AccessControl; create_app
applies it to the API routers, so routes never see it. Health, readiness, metrics, the docs and
the viewer page are not behind it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.web.problems import PROBLEM_MEDIA_TYPE, RateLimited, Unauthorized
from service.web.settings import Settings

_REALM = 'Bearer realm="attention-service"'

# The OpenAPI security scheme (HTTPBearer); auto_error=False so that the 401 is ours.
bearer = HTTPBearer(
    auto_error=False,
    description="An API key from ATTN_API_KEYS, sent as `Authorization: Bearer <key>`. "
    "Required only when the service is started with keys.",
)


def _digest(secret: bytes) -> bytes:
    # Fixed-length digests, so that compare_digest leaks not even the length of a key.
    return hashlib.sha256(secret).digest()


class ApiKeys:
    """The accepted keys, kept as digests; a key is known by its position (never logged)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [_digest(k.encode("utf-8", "surrogateescape")) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, token: str) -> int | None:
        """Index of the key equal to token, comparing against every key in constant time."""
        # Header values arrive decoded as latin-1: this gives back the bytes the client sent.
        given = _digest(token.encode("latin-1", "replace"))
        found = None
        for i, digest in enumerate(self._digests):
            # No early exit: the time taken does not depend on which key (if any) matched.
            if hmac.compare_digest(given, digest) and found is None:
                found = i
        return found


class RateLimiter:
    """A token bucket per caller: `per_minute` refill, `burst` capacity. In-process state only.

    Idle callers' buckets (full again) are dropped once more than `max_callers` are tracked, so
    many distinct clients cannot grow the table without bound.
    """

    def __init__(
        self,
        per_minute: int,
        burst: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_callers: int = 10_000,
    ) -> None:
        self.per_minute = per_minute
        self.capacity = float(burst or per_minute)
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max_callers = max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, caller: str) -> float:
        """Take one token: 0.0 when allowed, else the seconds until one is available."""
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


class AccessControl:
    """API keys and rate limit as configured; one per app."""

    def __init__(self, keys: ApiKeys, limiter: RateLimiter | None) -> None:
        self.keys = keys
        self.limiter = limiter

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessControl:
        keys = ApiKeys([k.get_secret_value() for k in settings.api_keys])
        limiter = (
            RateLimiter(settings.rate_limit, settings.rate_limit_burst)
            if settings.rate_limit
            else None
        )
        return cls(keys, limiter)

    def caller(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
        """Who is calling ("key-<n>" or "ip-<address>"), or Unauthorized."""
        if not self.keys.enabled:
            return "ip-" + (request.client.host if request.client else "unknown")
        if credentials is None:
            sent = request.headers.get("authorization")
            raise Unauthorized(
                "the Authorization header must be 'Bearer <key>'"
                if sent
                else "this service requires an API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": _REALM},
            )
        index = self.keys.identify(credentials.credentials)
        if index is None:
            raise Unauthorized(
                "the API key is not valid",
                headers={"WWW-Authenticate": _REALM + ', error="invalid_token"'},
            )
        return f"key-{index}"

    def charge(self, request: Request, caller: str) -> None:
        """Count a compute request (POST) against the caller's rate; reads are free."""
        if self.limiter is None or request.method in ("GET", "HEAD"):
            return
        wait = self.limiter.acquire(caller)
        if wait > 0:
            raise RateLimited(
                f"more than {self.limiter.per_minute} requests per minute (ATTN_RATE_LIMIT); "
                f"retry in {math.ceil(wait)} s",
                headers={"Retry-After": str(math.ceil(wait))},
            )


_PROBLEM = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}

# OpenAPI description of the answers `authorize` adds to every route it guards.
GUARD_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {
        "description": "Missing or invalid API key (only when ATTN_API_KEYS is set); see "
        "WWW-Authenticate.",
        "content": _PROBLEM,
    },
    429: {
        "description": "Over the rate limit (ATTN_RATE_LIMIT); retry after Retry-After seconds.",
        "content": _PROBLEM,
    },
}
