"""Records of the heatmap store (service.web.records), what memory sessions are kept in:
versioned values with a time to live, a compare-and-set that holds across processes sharing the
directory (no update lost), a bound on live records that drops expired ones first."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from service.web.store import HeatmapStore, RecordLimitReached, VersionConflict
from tests.support.record_writer import increment


def store(tmp_path: Path) -> HeatmapStore:
    return HeatmapStore(tmp_path / "store", 1 << 20, 100, ttl_s=3600)


def test_create_get_replace_delete(tmp_path: Path) -> None:
    s = store(tmp_path)
    first = s.create_record("sessions", "abc", b"one", ttl_s=60)
    assert first is not None and first.version == 1 and first.expires_at > time.time() + 50
    assert s.create_record("sessions", "abc", b"again", ttl_s=60) is None  # taken
    assert s.get_record("sessions", "abc").value == b"one"
    second = s.replace_record("sessions", "abc", b"two", version=1, ttl_s=60)
    assert second is not None and second.version == 2
    with pytest.raises(VersionConflict) as err:
        s.replace_record("sessions", "abc", b"stale", version=1, ttl_s=60)
    assert err.value.version == 2
    assert s.get_record("sessions", "abc").value == b"two"
    assert s.count_records("sessions") == 1
    assert s.delete_record("sessions", "abc") is True
    assert s.delete_record("sessions", "abc") is False
    assert s.get_record("sessions", "abc") is None
    assert s.replace_record("sessions", "abc", b"x", version=2, ttl_s=60) is None
    # Keys that could leave the namespace's directory never reach the filesystem.
    assert s.get_record("sessions", "../x") is None
    with pytest.raises(ValueError, match="key"):
        s.create_record("sessions", "a/b", b"", ttl_s=1)


def test_expiry_and_the_bound_on_live_records(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.create_record("sessions", "short", b"", ttl_s=0.3)
    s.create_record("sessions", "long", b"", ttl_s=60)
    with pytest.raises(RecordLimitReached):
        s.create_record("sessions", "third", b"", ttl_s=60, max_count=2)
    time.sleep(0.4)
    assert s.get_record("sessions", "short") is None
    assert s.create_record("sessions", "third", b"", ttl_s=60, max_count=2) is not None
    assert s.count_records("sessions") == 2
    assert not (s.directory / "records" / "sessions" / "short.rec").exists()  # dropped


def test_compare_and_set_across_processes_loses_no_update(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.create_record("counters", "n", b"0", ttl_s=3600)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        conflicts = pool.starmap(increment, [(str(s.directory), "n", 40)] * 4)
    record = s.get_record("counters", "n")
    assert record is not None
    assert int(record.value) == 160 and record.version == 161
    print("conflicts met and retried:", sum(conflicts))
