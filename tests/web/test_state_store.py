"""The state store's contract, run against both backends: the file store and a real Redis.

Heatmaps (ids, formats, expiry), records (create if absent, compare-and-set under concurrent
threads and processes, delete, expiry, a bound on their number) and rate budgets; then what the
Redis store does when Redis is not there: every operation that needs it raises
StoreUnavailable (never a miss), fast, and the rate limiter lets requests through, counted.
"""

from __future__ import annotations

import multiprocessing
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.core.errors import LimitError
from service.web.problems import StoreUnavailable
from service.web.store import (
    ID_PATTERN,
    SVG,
    RecordLimitReached,
    Store,
    VersionConflict,
)
from service.web.store.redisstore import RedisStore, redacted
from tests.support.http import free_port
from tests.support.redis_server import RedisServer
from tests.support.store_writer import MAX_BYTES, increment, open_backend

BACKENDS = ["files", "redis"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(backend, location, prefix): a fresh directory, or a fresh key prefix on one Redis."""
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        yield "redis", server.url, f"t{secrets.token_hex(4)}:"
    else:
        yield "files", str(tmp_path / "store"), ""


@pytest.fixture
def store(backend: tuple[str, str, str]) -> Iterator[Store]:
    s = open_backend(*backend)
    s.open()
    yield s
    s.close()


def _ttl_store(backend: tuple[str, str, str], ttl_s: float) -> Store:
    s = open_backend(*backend)
    s.ttl_s = ttl_s
    return s


# ---------------------------------------------------------------------------------------------
# Heatmaps


def test_images_are_stored_under_fresh_ids_with_their_svgs(store: Store) -> None:
    pngs, svgs = [b"\x89PNG one", b"\x89PNG two"], [b"<svg>1</svg>", b"<svg>2</svg>"]
    ids = store.put_images(pngs, svgs=svgs)
    plain = store.put_image(b"\x89PNG three")
    assert len(set(ids + [plain])) == 3 and all(ID_PATTERN.fullmatch(i) for i in ids + [plain])
    for image_id, png, svg in zip(ids, pngs, svgs, strict=True):
        assert store.get_image(image_id).data == png
        assert store.get_image(image_id, SVG).data == svg
    assert store.get_image(plain).data == b"\x89PNG three"
    assert store.get_image(plain, SVG) is None  # no SVG was stored for it
    assert 3500 <= store.get_image(plain).remaining_ttl() <= 3600
    # Unknown, malformed and hostile ids are misses, never errors.
    for bad in ("A" * 22, "../../etc/passwd", "", "A" * 23, ids[0] + "x"):
        assert store.get_image(bad) is None


def test_images_expire_after_the_ttl(backend: tuple[str, str, str]) -> None:
    store = _ttl_store(backend, ttl_s=1.0)
    image_id = store.put_image(b"soon gone")
    assert store.get_image(image_id).data == b"soon gone"
    time.sleep(1.3)
    assert store.get_image(image_id) is None


def test_one_request_s_images_must_fit_the_store(store: Store) -> None:
    with pytest.raises(LimitError, match="ATTN_HEATMAP_MAX_BYTES"):
        store.put_images([b"x" * (MAX_BYTES // 2 + 1), b"y" * (MAX_BYTES // 2 + 1)])


# ---------------------------------------------------------------------------------------------
# Records


def test_a_record_is_created_once_replaced_by_version_and_deleted(store: Store) -> None:
    first = store.create_record("sessions", "s1", b"state-0", ttl_s=60)
    assert first is not None and first.version == 1 and first.value == b"state-0"
    assert store.create_record("sessions", "s1", b"other", ttl_s=60) is None  # key taken
    got = store.get_record("sessions", "s1")
    assert got is not None and (got.value, got.version) == (b"state-0", 1)
    assert 55 < got.expires_at - time.time() <= 60

    second = store.replace_record("sessions", "s1", b"state-1", version=1, ttl_s=120)
    assert second is not None and second.version == 2
    assert 115 < second.expires_at - time.time() <= 120  # the TTL starts again
    with pytest.raises(VersionConflict) as conflict:  # a stale writer loses, and is told
        store.replace_record("sessions", "s1", b"lost", version=1, ttl_s=60)
    assert conflict.value.version == 2
    assert store.get_record("sessions", "s1").value == b"state-1"

    # Namespaces are apart; binary values travel unchanged.
    blob = bytes(range(256)) * 64
    assert store.create_record("other", "s1", blob, ttl_s=60) is not None
    assert store.get_record("other", "s1").value == blob

    assert store.delete_record("sessions", "s1") is True
    assert store.get_record("sessions", "s1") is None
    assert store.delete_record("sessions", "s1") is False
    assert store.replace_record("sessions", "s1", b"x", version=2, ttl_s=60) is None
    # Keys a URL could smuggle in are misses (reads) or refused (writes).
    assert store.get_record("sessions", "../x") is None
    with pytest.raises(ValueError):
        store.create_record("sessions", "a/b", b"", ttl_s=60)


def test_records_expire_and_their_number_is_bounded(store: Store) -> None:
    for key in ("a", "b"):
        assert store.create_record("sessions", key, b"", ttl_s=0.8, max_count=3)
    assert store.create_record("sessions", "c", b"", ttl_s=60, max_count=3)
    assert store.count_records("sessions") == 3
    with pytest.raises(RecordLimitReached):
        store.create_record("sessions", "d", b"", ttl_s=60, max_count=3)
    assert store.get_record("sessions", "d") is None
    time.sleep(1.1)
    # Expired records are gone and count no more: there is room again.
    assert store.get_record("sessions", "a") is None
    assert store.replace_record("sessions", "a", b"", version=1, ttl_s=60) is None
    assert store.count_records("sessions") == 1
    assert store.create_record("sessions", "d", b"", ttl_s=60, max_count=3) is not None
    assert store.create_record("sessions", "a", b"again", ttl_s=60).version == 1


def test_compare_and_set_loses_no_update_across_threads_and_processes(
    store: Store, backend: tuple[str, str, str]
) -> None:
    """The read-compute-replace cycle of a session append, by 4 threads and 2 processes at
    once: every increment lands exactly once."""
    store.create_record("counters", "n", b"0", ttl_s=3600)
    threads, processes, times = 4, 2, 25
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool, ThreadPoolExecutor(threads) as executor:
        remote = pool.starmap_async(increment, [(*backend, "n", times)] * processes)
        local = [executor.submit(increment, *backend, "n", times) for _ in range(threads)]
        conflicts = sum(f.result() for f in local) + sum(remote.get(timeout=120))
    record = store.get_record("counters", "n")
    total = (threads + processes) * times
    assert int(record.value) == total
    assert record.version == total + 1
    assert conflicts > 0  # they did contend, and each conflict was seen and retried


# ---------------------------------------------------------------------------------------------
# Rate budgets


def test_the_rate_limiter_is_a_token_bucket(store: Store) -> None:
    opened: list[int] = []
    limiter = store.rate_limiter(60, 2, lambda: opened.append(1))  # 1/s, 2 at once
    caller = f"key-{secrets.token_hex(4)}"
    assert limiter.acquire(caller) == 0 and limiter.acquire(caller) == 0
    wait = limiter.acquire(caller)
    assert 0.8 < wait <= 1.0
    assert limiter.acquire("ip-other") == 0  # callers are independent
    time.sleep(wait + 0.05)
    assert limiter.acquire(caller) == 0
    assert limiter.acquire(caller) > 0
    assert not opened


def test_replicas_share_one_budget_on_redis_and_keep_their_own_on_files(
    backend: tuple[str, str, str],
) -> None:
    a, b = open_backend(*backend), open_backend(*backend)  # two processes' stores
    limit_a, limit_b = (s.rate_limiter(6, 3, lambda: None) for s in (a, b))
    caller = f"key-{secrets.token_hex(4)}"
    answers = [lim.acquire(caller) == 0 for lim in (limit_a, limit_b, limit_a, limit_b)]
    if backend[0] == "redis":
        assert answers == [True, True, True, False]  # 3 in all, whichever replica is asked
    else:
        assert answers == [True, True, True, True]  # each process has its own 3


# ---------------------------------------------------------------------------------------------
# Redis away


def _quick_redis_store(url: str, *, ttl_s: float, retry_after_s: int) -> RedisStore:
    """A Redis store that gives up after a second, for the tests of Redis going away."""
    return RedisStore(
        url,
        prefix="t:",
        ttl_s=ttl_s,
        max_bytes=MAX_BYTES,
        max_count=10,
        timeout_s=1.0,
        retry_after_s=retry_after_s,
    )


def test_without_redis_every_operation_says_unavailable_never_absent(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    store = _quick_redis_store(f"redis://:s3cret@127.0.0.1:{port}/0", ttl_s=60, retry_after_s=2)
    store.open()  # a startup without Redis is not an error
    t0 = time.monotonic()
    health = store.health()
    assert time.monotonic() - t0 < 5
    assert not health.ok and "unreachable" in health.reason
    assert "s3cret" not in health.reason and "s3cret" not in str(health.facts)
    operations = [
        lambda: store.put_image(b"x"),
        lambda: store.get_image("A" * 22),
        lambda: store.create_record("sessions", "s", b"", ttl_s=60),
        lambda: store.get_record("sessions", "s"),
        lambda: store.replace_record("sessions", "s", b"", version=1, ttl_s=60),
        lambda: store.delete_record("sessions", "s"),
        lambda: store.count_records("sessions"),
        store.check_available,
    ]
    for op in operations:
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable) as exc:
            op()
        assert time.monotonic() - t0 < 3
        assert exc.value.status == 503 and exc.value.headers == {"Retry-After": "2"}
    opened: list[int] = []
    limiter = store.rate_limiter(1, 1, lambda: opened.append(1))
    assert [limiter.acquire("ip-a") for _ in range(3)] == [0.0, 0.0, 0.0]  # fails open
    assert len(opened) == 3


def test_a_redis_restart_is_survived_without_touching_its_data(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        store = _quick_redis_store(server.url, ttl_s=600, retry_after_s=1)
        store.open()
        image_id = store.put_image(b"kept")
        store.create_record("sessions", "s", b"v1", ttl_s=600)
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.get_image(image_id)
        server.start()  # Redis loads its own saved data; the service rebuilds nothing
        deadline = time.monotonic() + 10
        while not store.health().ok:
            assert time.monotonic() < deadline, "not usable again within 10 s"
            time.sleep(0.2)
        assert store.get_image(image_id).data == b"kept"
        assert store.replace_record("sessions", "s", b"v2", version=1, ttl_s=600).version == 2
        # Exactly what the service wrote, nothing more (no marker keys, no rewrite).
        keys = sorted(k.decode() for k in server.client().keys("*"))
        assert keys == [f"t:heatmap:{image_id}.png", "t:record:sessions:s", "t:records:sessions"]
    finally:
        server.stop()


def test_urls_are_shown_without_their_password() -> None:
    assert redacted("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redacted("redis://u:pw@h/0") == "redis://u:***@h/0"
    assert redacted("redis://h:6379/0") == "redis://h:6379/0"
