"""Where a test's service keeps its state: the file store (the default) or a real Redis.

Modules that set `BOTH_STORES = True` run every test that uses `store_backend` (directly, or
through the `client` and `server` fixtures of tests/conftest.py) once per backend. A test that
makes its own app passes `**store_backend.settings()` (Settings fields), one that starts its own
servers `store_backend.env()` (the same as ATTN_ variables). On Redis each call names a fresh
key prefix, so apps sharing one redis-server keep apart; servers meant to share their state
are given the same env."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

BACKENDS = ("files", "redis")


@dataclass(frozen=True)
class StoreBackend:
    name: str
    redis_url: str = ""  # empty: the file store (each app's own heatmap directory)

    def _prefix(self) -> str:
        return f"t{secrets.token_hex(4)}:"

    def settings(self) -> dict[str, Any]:
        if not self.redis_url:
            return {}
        return {"redis_url": self.redis_url, "redis_prefix": self._prefix()}

    def env(self) -> dict[str, str]:
        if not self.redis_url:
            return {}
        return {"ATTN_REDIS_URL": self.redis_url, "ATTN_REDIS_PREFIX": self._prefix()}


FILES = StoreBackend("files")
