"""The file store, the embedded default: heatmaps and records in a directory, nothing to run.

Several processes (uvicorn workers, replicas on one volume) may share the directory: files are
written to a temporary name and renamed into place (atomic), and eviction, writing and every
compare-and-set run under an advisory file lock, so the limits and the record versions hold
across writers: the stored images never exceed max_bytes or max_count (an interrupted writer's
temporary file is removed after a minute). The directory itself is the only state, so a restart
loses nothing: an id listed before it is served, or (expired, evicted) is a clean miss. Only
files named like an id are ever counted or deleted, so a directory shared with other files loses
none of them. Records live under records/<namespace>/; rate budgets in each process's memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service.web.ratelimit import LocalRateLimiter, RateLimiter
from service.web.store.base import (
    PNG,
    SUFFIXES,
    Record,
    RecordLimitReached,
    Store,
    StoredImage,
    StoreHealth,
    VersionConflict,
    valid_id,
)

_LOCK_NAME = ".lock"
_RECORDS = "records"
_RECORD_SUFFIX = ".rec"
# A record file: version (int64) and expiry (float64, Unix time), then the value.
_HEADER = struct.Struct("<qd")


class FileStore(Store):
    """The store in `directory`; images bounded in bytes, count and age, evicted on put."""

    backend = "files"

    def __init__(self, directory: Path, max_bytes: int, max_count: int, ttl_s: float) -> None:
        super().__init__(max_bytes, max_count, ttl_s)
        self.directory = Path(directory)

    def open(self) -> None:
        """Create the directory and bring it within the limits (at startup; they may be lower
        than the last run's)."""
        with self._locked(self.directory):
            self._evict(incoming_bytes=0, incoming_count=0)

    def writable(self) -> bool:
        """True when a file can be created and removed in the directory."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError:
            return False

    def health(self) -> StoreHealth:
        facts = {"backend": self.backend, "directory": str(self.directory)}
        if not self.writable():
            return StoreHealth(False, facts, f"the heatmap store {self.directory} is not writable")
        return StoreHealth(True, {**facts, "writable": True})

    # -- heatmaps -------------------------------------------------------------------------

    def _path(self, image_id: str, suffix: str = PNG) -> Path:
        return self.directory / (image_id + suffix)

    def _put_files(self, files: list[tuple[str, str, bytes]]) -> None:
        """Evicts first so the limits hold after writing (an SVG counts as a file of its own)."""
        incoming = sum(len(data) for _, _, data in files)
        with self._locked(self.directory):
            self._evict(incoming_bytes=incoming, incoming_count=len(files))
            for image_id, suffix, data in files:
                _write_atomic(self._path(image_id, suffix), data)

    def _get_image(self, image_id: str, suffix: str) -> StoredImage | None:
        path = self._path(image_id, suffix)
        try:
            with open(path, "rb") as f:
                expires_at = os.fstat(f.fileno()).st_mtime + self.ttl_s
                if time.time() > expires_at:
                    return None
                return StoredImage(f.read(), expires_at)
        except OSError:  # unknown, or evicted meanwhile
            return None

    def _evict(self, incoming_bytes: int, incoming_count: int) -> None:
        """Delete expired images, then the oldest until the new ones fit the limits."""
        now = time.time()
        entries: list[tuple[float, int, str]] = []
        with os.scandir(self.directory) as it:
            for entry in it:
                name = entry.name
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if name.startswith(".tmp-"):
                    # A writer that died mid-write leaves these; give live writers a minute.
                    if now - st.st_mtime > 60:
                        _unlink(entry.path)
                    continue
                stem, dot, ext = name.rpartition(".")
                if not (dot and "." + ext in SUFFIXES and valid_id(stem)):
                    continue
                if now - st.st_mtime > self.ttl_s:
                    _unlink(entry.path)
                    continue
                entries.append((st.st_mtime, st.st_size, entry.path))
        entries.sort()
        total = sum(size for _, size, _ in entries) + incoming_bytes
        count = len(entries) + incoming_count
        for _, size, path in entries:
            if total <= self.max_bytes and count <= self.max_count:
                break
            _unlink(path)
            total -= size
            count -= 1

    # -- records --------------------------------------------------------------------------

    def _namespace(self, namespace: str) -> Path:
        return self.directory / _RECORDS / namespace

    def _record_path(self, namespace: str, key: str) -> Path:
        return self._namespace(namespace) / (key + _RECORD_SUFFIX)

    def _create_record(
        self, namespace: str, key: str, value: bytes, *, ttl_s: float, max_count: int
    ) -> Record | None:
        path = self._record_path(namespace, key)
        with self._locked(path.parent):
            if _read_record(path) is not None:
                return None
            if max_count and self._live_records(path.parent) >= max_count:
                raise RecordLimitReached(max_count)
            return _write_record(path, value, 1, ttl_s)

    def _get_record(self, namespace: str, key: str) -> Record | None:
        return _read_record(self._record_path(namespace, key))

    def _replace_record(
        self, namespace: str, key: str, value: bytes, *, version: int, ttl_s: float
    ) -> Record | None:
        path = self._record_path(namespace, key)
        with self._locked(path.parent):
            current = _read_record(path)
            if current is None:
                return None
            if current.version != version:
                raise VersionConflict(current.version)
            return _write_record(path, value, version + 1, ttl_s)

    def _delete_record(self, namespace: str, key: str) -> bool:
        path = self._record_path(namespace, key)
        with self._locked(path.parent):
            live = _read_record(path) is not None
            _unlink(str(path))
            return live

    def _count_records(self, namespace: str) -> int:
        directory = self._namespace(namespace)
        with self._locked(directory):
            return self._live_records(directory)

    @staticmethod
    def _live_records(directory: Path) -> int:
        """Live records in directory; expired ones are deleted on the way (under its lock)."""
        live = 0
        for path in directory.glob("*" + _RECORD_SUFFIX):
            if _read_record(path) is None:
                _unlink(str(path))
            else:
                live += 1
        return live

    # -- rate budgets ---------------------------------------------------------------------

    def rate_limiter(
        self, per_minute: int, burst: int, on_fail_open: Callable[[], None]
    ) -> RateLimiter:
        # Budgets in this process: with W workers or replicas, a key gets up to W budgets.
        return LocalRateLimiter(per_minute, burst)

    # -- helpers --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, directory: Path) -> Iterator[None]:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{secrets.token_hex(8)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _read_record(path: Path) -> Record | None:
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) < _HEADER.size:  # not one of ours
        return None
    version, expires_at = _HEADER.unpack_from(raw)
    if time.time() >= expires_at:
        return None
    return Record(raw[_HEADER.size :], version, expires_at)


def _write_record(path: Path, value: bytes, version: int, ttl_s: float) -> Record:
    expires_at = time.time() + ttl_s
    _write_atomic(path, _HEADER.pack(version, expires_at) + value)
    return Record(value, version, expires_at)


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
