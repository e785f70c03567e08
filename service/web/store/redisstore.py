"""The Redis store (ATTN_REDIS_URL): heatmaps, records and rate budgets shared by every replica.

- Heatmaps are strings with Redis's own expiry (ATTN_HEATMAP_TTL_S); Redis bounds the memory
  (its `maxmemory`, with an eviction policy such as volatile-lru), not the service: the service
  never scans, evicts, flushes or rewrites what Redis holds, at startup or ever.
- Records are hashes {value, version} with an expiry, plus one sorted set per namespace (key ->
  expiry) that counts them; creating and the compare-and-set replacement are Lua scripts, atomic
  on the server.
- Rate budgets: GCRA (the generic cell rate algorithm, the token bucket as one timestamp per
  caller) in a Lua script, on Redis's clock, so every replica draws from one budget per caller.

When Redis cannot be reached, operations raise StoreUnavailable at once for a second after each
failure (no request waits on a dead server), then try again; the rate limiter lets requests
through meanwhile (fail open) and reports each one. health() always probes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.web.problems import StoreUnavailable
from service.web.ratelimit import RateLimiter, capacity
from service.web.store import base

log = logging.getLogger("service")

T = TypeVar("T")

# After a failure, operations fail fast for this long before Redis is tried again.
_PROBE_INTERVAL_S = 1.0

# KEYS: record, index. ARGV: value, ttl ms, max count, key. Returns {status, expiry ms}:
# status 1 created, 0 key taken, -1 namespace full.
_CREATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end
local max = tonumber(ARGV[3])
if max > 0 and redis.call('ZCARD', KEYS[2]) >= max then return {-1, 0} end
local expiry = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'version', 1)
redis.call('PEXPIREAT', KEYS[1], expiry)
redis.call('ZADD', KEYS[2], expiry, ARGV[4])
return {1, expiry}
"""

# KEYS: record, index. ARGV: value, ttl ms, expected version, key. Returns {status, version,
# expiry ms}: status 1 replaced, 0 another version (given), -1 gone.
_REPLACE = """
local version = redis.call('HGET', KEYS[1], 'version')
if not version then return {-1, 0, 0} end
version = tonumber(version)
if version ~= tonumber(ARGV[3]) then return {0, version, 0} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'version', version + 1)
redis.call('PEXPIREAT', KEYS[1], expiry)
redis.call('ZADD', KEYS[2], expiry, ARGV[4])
return {1, version + 1, expiry}
"""

# GCRA. KEYS: the caller's budget. ARGV: emission interval and capacity x interval, in
# microseconds. The key holds the theoretical arrival time (TAT); a request is allowed when the
# new TAT lies at most capacity x interval ahead of now. Returns 0 (allowed) or the
# microseconds until a request would be.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[1])
local over = new_tat - now - tonumber(ARGV[2])
if over > 0 then return math.ceil(over) end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return 0
"""


def redacted(url: str) -> str:
    """The URL without its password (for /readyz and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + host))


class RedisStore(base.Store):
    backend = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        ttl_s: float,
        max_bytes: int,
        max_count: int,
        timeout_s: float,
        retry_after_s: int,
    ) -> None:
        super().__init__(max_bytes, max_count, ttl_s)
        self.url = url
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        # One quick retry on a fresh connection (pooled ones die when Redis restarts), no
        # backoff: a request never waits long on Redis; the breaker below does the rest.
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self._create = self._client.register_script(_CREATE)
        self._replace = self._client.register_script(_REPLACE)
        self._gcra = self._client.register_script(_GCRA)
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic; operations fail fast before it
        self._down_reason: str | None = None

    # -- life and health ------------------------------------------------------------------

    def open(self) -> None:
        try:
            info = self._call(lambda c: c.config_get("maxmemory"))
        except StoreUnavailable:
            log.warning("Redis store %s unreachable at startup; not ready", redacted(self.url))
            return
        except redis.ResponseError:  # CONFIG disabled (managed Redis): nothing to check
            return
        if int(next(iter(info.values()), None) or 0) == 0:
            log.warning(
                "Redis at %s has no memory bound (maxmemory 0): heatmaps are bounded by their "
                "TTL only; set maxmemory with a volatile-* eviction policy",
                redacted(self.url),
            )

    def close(self) -> None:
        self._client.close()

    def health(self) -> base.StoreHealth:
        facts = {"backend": self.backend, "url": redacted(self.url)}
        try:
            self._client.ping()
        except redis.RedisError as exc:
            self._failed(exc)
            return base.StoreHealth(
                False, facts, f"the Redis store {redacted(self.url)} is unreachable: {exc}"
            )
        self._succeeded()
        return base.StoreHealth(True, {**facts, "connected": True})

    def check_available(self) -> None:
        with self._lock:
            if time.monotonic() < self._down_until:
                raise self._unavailable()

    def _unavailable(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"the state store (Redis at {redacted(self.url)}) is unreachable"
            + (f": {self._down_reason}" if self._down_reason else "")
            + "; retry later",
            headers={"Retry-After": str(self.retry_after_s)},
        )

    def _failed(self, exc: Exception) -> None:
        with self._lock:
            if self._down_reason is None:
                log.warning("Redis store %s unreachable: %s", redacted(self.url), exc)
            self._down_reason = str(exc) or type(exc).__name__
            self._down_until = time.monotonic() + _PROBE_INTERVAL_S

    def _succeeded(self) -> None:
        with self._lock:
            if self._down_reason is not None:
                log.warning("Redis store %s reachable again", redacted(self.url))
            self._down_reason = None
            self._down_until = 0.0

    def _call(self, op: Callable[[redis.Redis], T]) -> T:
        """op(client), or StoreUnavailable when Redis cannot be reached (now or lately)."""
        self.check_available()
        try:
            result = op(self._client)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._failed(exc)
            raise self._unavailable() from exc
        except redis.ResponseError as exc:
            if str(exc).startswith("OOM"):  # maxmemory reached under noeviction
                raise StoreUnavailable(
                    "the state store (Redis) is full (maxmemory); retry later",
                    headers={"Retry-After": str(self.retry_after_s)},
                ) from exc
            raise
        if self._down_reason is not None:
            self._succeeded()
        return result

    # -- heatmaps -------------------------------------------------------------------------

    def _image_key(self, image_id: str, suffix: str) -> str:
        return f"{self.prefix}heatmap:{image_id}{suffix}"

    def _put_files(self, files: list[tuple[str, str, bytes]]) -> None:
        ttl_ms = int(self.ttl_s * 1000)

        def write(c: redis.Redis) -> None:
            with c.pipeline(transaction=True) as pipe:
                for image_id, suffix, data in files:
                    pipe.set(self._image_key(image_id, suffix), data, px=ttl_ms)
                pipe.execute()

        self._call(write)

    def _get_image(self, image_id: str, suffix: str) -> base.StoredImage | None:
        key = self._image_key(image_id, suffix)

        def read(c: redis.Redis) -> list[Any]:
            with c.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                return pipe.execute()

        data, ttl_ms = self._call(read)
        if data is None:
            return None
        return base.StoredImage(data, time.time() + max(ttl_ms, 0) / 1000)

    # -- records --------------------------------------------------------------------------

    def _record_keys(self, namespace: str, key: str) -> list[str]:
        return [f"{self.prefix}record:{namespace}:{key}", f"{self.prefix}records:{namespace}"]

    def _create_record(
        self, namespace: str, key: str, value: bytes, *, ttl_s: float, max_count: int
    ) -> base.Record | None:
        keys = self._record_keys(namespace, key)
        args: list[bytes | int | str] = [value, _ms(ttl_s), max_count, key]
        status, expiry = self._call(lambda c: self._create(keys=keys, args=args, client=c))
        if status == -1:
            raise base.RecordLimitReached(max_count)
        return base.Record(value, 1, expiry / 1000) if status == 1 else None

    def _get_record(self, namespace: str, key: str) -> base.Record | None:
        record_key = self._record_keys(namespace, key)[0]

        def read(c: redis.Redis) -> list[Any]:
            with c.pipeline(transaction=True) as pipe:
                pipe.hmget(record_key, "value", "version")
                pipe.pttl(record_key)
                return pipe.execute()

        (value, version), ttl_ms = self._call(read)
        if value is None or version is None:
            return None
        return base.Record(value, int(version), time.time() + max(ttl_ms, 0) / 1000)

    def _replace_record(
        self, namespace: str, key: str, value: bytes, *, version: int, ttl_s: float
    ) -> base.Record | None:
        keys = self._record_keys(namespace, key)
        args: list[bytes | int | str] = [value, _ms(ttl_s), version, key]
        status, current, expiry = self._call(
            lambda c: self._replace(keys=keys, args=args, client=c)
        )
        if status == -1:
            return None
        if status == 0:
            raise base.VersionConflict(int(current))
        return base.Record(value, int(current), expiry / 1000)

    def _delete_record(self, namespace: str, key: str) -> bool:
        record_key, index = self._record_keys(namespace, key)

        def delete(c: redis.Redis) -> int:
            with c.pipeline(transaction=True) as pipe:
                pipe.delete(record_key)
                pipe.zrem(index, key)
                return pipe.execute()[0]

        return bool(self._call(delete))

    def _count_records(self, namespace: str) -> int:
        index = self._record_keys(namespace, "-")[1]

        def count(c: redis.Redis) -> int:
            now_ms = int(time.time() * 1000)
            with c.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(index, "-inf", now_ms)
                pipe.zcard(index)
                return pipe.execute()[1]

        return int(self._call(count))

    # -- rate budgets ---------------------------------------------------------------------

    def rate_limiter(
        self, per_minute: int, burst: int, on_fail_open: Callable[[], None]
    ) -> RateLimiter:
        return RedisRateLimiter(self, per_minute, burst, on_fail_open)

    def gcra(self, caller: str, interval_us: int, tolerance_us: int) -> int:
        """One GCRA step for caller: 0 allowed, else microseconds to wait."""
        keys = [f"{self.prefix}rate:{caller}"]
        return int(
            self._call(lambda c: self._gcra(keys=keys, args=[interval_us, tolerance_us], client=c))
        )


class RedisRateLimiter:
    """One budget per caller across every replica; allows (fails open) when Redis is down."""

    remote = True

    def __init__(
        self, store: RedisStore, per_minute: int, burst: int, on_fail_open: Callable[[], None]
    ) -> None:
        self.per_minute = per_minute
        self._store = store
        self._interval_us = math.ceil(60e6 / per_minute)
        self._tolerance_us = int(capacity(per_minute, burst) * self._interval_us)
        self._on_fail_open = on_fail_open
        self._failing_open = False

    def acquire(self, caller: str) -> float:
        try:
            wait_us = self._store.gcra(caller, self._interval_us, self._tolerance_us)
        except StoreUnavailable as exc:
            # Fail open: an unreachable Redis must not take the service down with it. Logged
            # once per outage, counted per request.
            if not self._failing_open:
                self._failing_open = True
                log.warning("rate limit failing open (requests allowed): %s", exc.detail)
            self._on_fail_open()
            return 0.0
        if self._failing_open:
            self._failing_open = False
            log.warning("rate limit enforced again: Redis is back")
        return wait_us / 1e6


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
