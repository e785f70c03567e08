"""The file store's heatmaps: bounded in bytes and count under concurrent writers (threads and
processes) and readers, intact across a restart, and harmless to files it did not write. (What
both backends share, records and rate budgets included, is in test_state_store.py.)"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.core.errors import LimitError
from service.web.store import ID_PATTERN, FileStore
from tests.support.http import app_client, assert_problem, post
from tests.support.store_writer import MAX_BYTES, MAX_COUNT, blob, write_images


def _usage(store: FileStore) -> tuple[int, int]:
    """(bytes, count) of stored images, measured between two writers (under the store lock)."""
    with store._locked(store.directory):
        paths = [p for p in store.directory.glob("*.png") if ID_PATTERN.fullmatch(p.stem)]
        sizes = [p.stat().st_size for p in paths]
    return sum(sizes), len(sizes)


def test_limits_hold_under_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = FileStore(tmp_path, MAX_BYTES, MAX_COUNT, ttl_s=3600)
    store.open()
    written: dict[str, str] = {}
    lock = threading.Lock()
    done, writers_done = threading.Event(), threading.Event()
    peaks: list[tuple[int, int]] = []
    failures: list[str] = []

    def thread_writer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        rounds = 0
        while rounds < 30 or not writers_done.is_set():  # until the other processes are done
            rounds += 1
            images = [blob(rng) for _ in range(int(rng.integers(1, 4)))]
            ids = store.put_images(images)
            with lock:
                written.update(
                    (i, hashlib.sha256(d).hexdigest()) for i, d in zip(ids, images, strict=True)
                )

    def reader() -> None:
        while not done.is_set():
            with lock:
                ids = list(written.items())[-30:]
            for image_id, digest in ids:
                image = store.get_image(image_id)
                # Served whole, or a clean miss (evicted): never a torn or foreign file.
                if image is not None and hashlib.sha256(image.data).hexdigest() != digest:
                    failures.append(image_id)
            time.sleep(0.001)

    def monitor() -> None:
        while not done.is_set():
            peaks.append(_usage(store))
            time.sleep(0.005)

    # spawn, not fork: this process has threads (forking them can deadlock the child).
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as processes:
        remote = [processes.submit(write_images, str(tmp_path), 100 + i, 30) for i in range(2)]
        threads = [threading.Thread(target=thread_writer, args=(i,)) for i in range(2)]
        watchers = [threading.Thread(target=f) for f in (reader, reader, monitor)]
        for t in threads + watchers:
            t.start()
        try:
            for f in remote:
                written.update(f.result(timeout=60))
        finally:
            writers_done.set()
            for t in threads:
                t.join()
            done.set()
            for t in watchers:
                t.join()

    assert not failures
    assert peaks and max(b for b, _ in peaks) <= MAX_BYTES
    assert max(c for _, c in peaks) <= MAX_COUNT
    total, count = _usage(store)
    assert total <= MAX_BYTES and count <= MAX_COUNT
    # Something was evicted (the test wrote far more than fits), and what is left is intact.
    assert len(written) > 4 * MAX_COUNT
    for path in tmp_path.glob("*.png"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() == written[path.stem]
    assert not list(tmp_path.glob(".tmp-*"))


def test_files_it_did_not_write_are_never_counted_or_deleted(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_bytes(b"x" * 50_000)  # over the byte limit on its own
    (tmp_path / "readme.txt").write_text("not an image")
    store = FileStore(tmp_path, MAX_BYTES, MAX_COUNT, ttl_s=3600)
    store.open()
    rng = np.random.default_rng(0)
    ids = [store.put_image(blob(rng)) for _ in range(3 * MAX_COUNT)]
    assert (tmp_path / "notes.png").stat().st_size == 50_000
    assert (tmp_path / "readme.txt").exists()
    assert store.get_image(ids[-1]) is not None  # the foreign file did not crowd out the newest


def test_a_writer_s_stale_temporary_file_is_removed(tmp_path: Path) -> None:
    store = FileStore(tmp_path, MAX_BYTES, MAX_COUNT, ttl_s=3600)
    stale, fresh = tmp_path / ".tmp-deadwriter", tmp_path / ".tmp-livewriter"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 120
    os.utime(stale, (old, old))
    store.open()
    assert not stale.exists()
    assert fresh.exists()  # a live writer in another process may still rename it


def test_a_restart_serves_what_was_listed_or_answers_404(tmp_path: Path) -> None:
    body = {"q": np.eye(3).tolist(), "k": np.eye(3).tolist(), "v": np.eye(3).tolist()}
    listed: list[tuple[str, bytes]] = []
    with app_client(tmp_path) as c:
        for _ in range(3):
            r = post(c, "/v1/attention", {**body, "heatmap": {"heads": "all"}})
            assert r.status_code == 200, r.text
            for image in r.json()["heatmaps"]:
                listed.append((image["url"], c.get(image["url"]).content))
    # Same limits: everything is still served, byte for byte.
    with app_client(tmp_path) as c:
        for url, png in listed:
            r = c.get(url)
            assert r.status_code == 200 and r.content == png
    # Restarted with room for one image: the startup brings the store within the new limits;
    # the newest is served, every other is a clean 404 problem.
    with app_client(tmp_path, heatmap_max_count=1) as c:
        assert len(list((tmp_path / "heatmaps").glob("*.png"))) == 1
        answers = [c.get(url) for url, _ in listed]
        assert [r.status_code for r in answers].count(200) == 1
        for r, (_, png) in zip(answers, listed, strict=True):
            if r.status_code == 200:
                assert r.content == png
            else:
                assert_problem(r, 404)


def test_store_bounds_count_and_evicts_oldest_first(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=10_000, max_count=3, ttl_s=60)
    ids = []
    for i in range(5):
        ids.append(store.put_image(bytes([i]) * 100))
        path = tmp_path / f"{ids[-1]}.png"
        os.utime(path, (time.time() - 50 + i, time.time() - 50 + i))  # distinct ages
    assert len(set(ids)) == 5 and all(ID_PATTERN.fullmatch(i) for i in ids)
    assert [store.get_image(i) is not None for i in ids] == [False, False, True, True, True]
    assert store.get_image(ids[4]).data == bytes([4]) * 100


def test_store_bounds_bytes_and_drops_expired(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=250, max_count=100, ttl_s=60)
    a = store.put_image(b"a" * 100)
    os.utime(tmp_path / f"{a}.png", (time.time() - 10, time.time() - 10))
    b = store.put_image(b"b" * 100)
    c = store.put_image(b"c" * 100)  # 300 bytes would exceed 250: the oldest goes
    assert store.get_image(a) is None and store.get_image(b) and store.get_image(c)
    os.utime(tmp_path / f"{b}.png", (time.time() - 100, time.time() - 100))
    store.put_image(b"d")
    assert not (tmp_path / f"{b}.png").exists()  # expired files are deleted on the next put
    with pytest.raises(LimitError):
        store.put_images([b"x" * 200, b"y" * 200])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _writer(directory: str, n: int) -> int:
    store = FileStore(Path(directory), max_bytes=50_000, max_count=10, ttl_s=60)
    for i in range(n):
        store.put_image(os.urandom(1000 + i))
    return n


def test_store_limits_hold_with_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=50_000, max_count=10, ttl_s=60)
    with ThreadPoolExecutor(6) as pool:
        puts = [pool.submit(store.put_image, os.urandom(1000)) for _ in range(60)]
        ids = [f.result() for f in puts]
        gets = list(pool.map(store.get_image, ids))
    assert all(g is None or len(g.data) == 1000 for g in gets)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as procs:
        assert sum(procs.starmap(_writer, [(str(tmp_path), 15)] * 3)) == 45
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) <= 10 and sum(p.stat().st_size for p in pngs) <= 50_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
