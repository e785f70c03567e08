"""A record writer for tests/web/test_records.py, run in other processes (a small module, so that
a spawned child imports little): read-modify-write cycles on one counter record."""

from __future__ import annotations

from pathlib import Path

from service.web.store import HeatmapStore, VersionConflict


def increment(directory: str, key: str, times: int) -> int:
    """Adds 1 to the counter `times` times, each by compare-and-set (read again on a conflict);
    returns how many conflicts it met."""
    store = HeatmapStore(Path(directory), 1 << 20, 100, ttl_s=3600)
    conflicts = 0
    done = 0
    while done < times:
        record = store.get_record("counters", key)
        assert record is not None
        value = str(int(record.value) + 1).encode()
        try:
            store.replace_record("counters", key, value, version=record.version, ttl_s=3600)
        except VersionConflict:
            conflicts += 1
            continue
        done += 1
    return conflicts
