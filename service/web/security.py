"""Who may call /v1 and /v2: optional API keys (Bearer) and an optional per-caller rate limit.

`service.web.deps.authorize` is the FastAPI dependency built on AccessControl; create_app
applies it to the API routers, so routes never see it. Health, readiness, metrics, the docs and
the viewer page are not behind it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.web.problems import PROBLEM_MEDIA_TYPE, RateLimited, Unauthorized
from service.web.ratelimit import RateLimiter
from service.web.settings import Settings
from service.web.store import Store

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
    """The accepted keys, kept as digests; a key is known by a prefix of its digest, which is
    the same on every replica and across restarts whatever the order of ATTN_API_KEYS (rate
    budgets and sessions in a shared store belong to it), and never shows the key itself."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = [_digest(k.encode("utf-8", "surrogateescape")) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, token: str) -> str | None:
        """The name of the key equal to token, comparing against every key in constant time."""
        # Header values arrive decoded as latin-1: this gives back the bytes the client sent.
        given = _digest(token.encode("latin-1", "replace"))
        found = None
        for digest in self._digests:
            # No early exit: the time taken does not depend on which key (if any) matched.
            if hmac.compare_digest(given, digest) and found is None:
                found = digest
        # 64 bits of a SHA-256 of the key: a name, not a way back to the key.
        return None if found is None else found[:8].hex()


class AccessControl:
    """API keys and rate limit as configured; one per app."""

    def __init__(self, keys: ApiKeys, limiter: RateLimiter | None) -> None:
        self.keys = keys
        self.limiter = limiter

    @classmethod
    def from_settings(
        cls, settings: Settings, store: Store, on_fail_open: Callable[[], None]
    ) -> AccessControl:
        """Keys from the settings; rate budgets where the store keeps state (see
        Store.rate_limiter); on_fail_open counts requests let through without a budget."""
        keys = ApiKeys([k.get_secret_value() for k in settings.api_keys])
        limiter = (
            store.rate_limiter(settings.rate_limit, settings.rate_limit_burst, on_fail_open)
            if settings.rate_limit
            else None
        )
        return cls(keys, limiter)

    def caller(self, request: Request, credentials: HTTPAuthorizationCredentials | None) -> str:
        """Who is calling ("key-<digest prefix>" or "ip-<address>"), or Unauthorized."""
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
        name = self.keys.identify(credentials.credentials)
        if name is None:
            raise Unauthorized(
                "the API key is not valid",
                headers={"WWW-Authenticate": _REALM + ', error="invalid_token"'},
            )
        return f"key-{name}"

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
