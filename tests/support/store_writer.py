"""A heatmap-store writer for tests/web/test_store.py, run in other processes (a small module, so
that a spawned child imports little)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from service.web.store import HeatmapStore

MAX_BYTES, MAX_COUNT = 40_000, 12


def blob(rng: np.random.Generator) -> bytes:
    # Sizes vary so that the byte limit, not only the count, decides what is evicted.
    return rng.bytes(int(rng.integers(500, 6000)))


def write_images(directory: str, seed: int, rounds: int) -> dict[str, str]:
    """Runs in another process: puts images, returns id -> sha256 of what it wrote."""
    store = HeatmapStore(Path(directory), MAX_BYTES, MAX_COUNT, ttl_s=3600)
    rng = np.random.default_rng(seed)
    written = {}
    for _ in range(rounds):
        images = [blob(rng) for _ in range(int(rng.integers(1, 4)))]
        for image_id, data in zip(store.put_many(images), images, strict=True):
            written[image_id] = hashlib.sha256(data).hexdigest()
    return written
