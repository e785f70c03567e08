"""State-store workers for tests/web/test_store.py and test_state_store.py, run in other
processes too (a small module, so that a spawned child imports little)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from service.web.store import FileStore, Store, VersionConflict

MAX_BYTES, MAX_COUNT = 40_000, 12


def blob(rng: np.random.Generator) -> bytes:
    # Sizes vary so that the byte limit, not only the count, decides what is evicted.
    return rng.bytes(int(rng.integers(500, 6000)))


def write_images(directory: str, seed: int, rounds: int) -> dict[str, str]:
    """Runs in another process: puts images, returns id -> sha256 of what it wrote."""
    store = FileStore(Path(directory), MAX_BYTES, MAX_COUNT, ttl_s=3600)
    rng = np.random.default_rng(seed)
    written = {}
    for _ in range(rounds):
        images = [blob(rng) for _ in range(int(rng.integers(1, 4)))]
        for image_id, data in zip(store.put_images(images), images, strict=True):
            written[image_id] = hashlib.sha256(data).hexdigest()
    return written


def open_backend(backend: str, location: str, prefix: str = "test:") -> Store:
    """A store like the one a service process opens: files in `location`, or Redis at it."""
    if backend == "redis":
        from service.web.store.redisstore import RedisStore

        return RedisStore(
            location,
            prefix=prefix,
            ttl_s=3600,
            max_bytes=MAX_BYTES,
            max_count=MAX_COUNT,
            timeout_s=2.0,
            retry_after_s=1,
        )
    return FileStore(Path(location), MAX_BYTES, MAX_COUNT, ttl_s=3600)


def increment(backend: str, location: str, prefix: str, key: str, times: int) -> int:
    """Runs in another process too: adds 1 to a counter record `times` times by
    compare-and-set, reading again after each conflict; returns the conflicts met."""
    store = open_backend(backend, location, prefix)
    conflicts = 0
    for _ in range(times):
        while True:
            record = store.get_record("counters", key)
            assert record is not None
            value = str(int(record.value) + 1).encode()
            try:
                store.replace_record("counters", key, value, version=record.version, ttl_s=3600)
                break
            except VersionConflict:
                conflicts += 1
    return conflicts
