"""Records in the heatmap store's directory: small versioned values under a namespace and a key,
with a time to live (the state of a memory session).

`create_record` writes only if the key is free and the namespace holds fewer than `max_count`
live records; `replace_record` is a compare-and-set on the version, so a read-compute-replace
cycle (appending a segment to a session) is atomic across every process sharing the directory:
of two concurrent replacements of one version, one wins and the other gets VersionConflict,
and nothing is lost or reordered. Files live under records/<namespace>/<key>.rec (a header of
version and expiry, then the value), written to a temporary name and renamed into place; every
write runs under an advisory lock of the namespace's directory (fcntl.flock), reads need none.

The store's record interface; the store (service.web.store.HeatmapStore) has it through this
mixin. A shared backend (Redis) is to offer the same methods.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# A record's namespace and key: what a URL path segment or a file name can hold safely.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
_RECORDS = "records"
_RECORD_SUFFIX = ".rec"
_LOCK_NAME = ".lock"
# A record file: version (int64) and expiry (float64, Unix time), then the value.
_HEADER = struct.Struct("<qd")


@dataclass(frozen=True)
class Record:
    """A record's value, its version (1 when created, +1 per replacement) and expiry."""

    value: bytes
    version: int
    expires_at: float  # Unix time


class VersionConflict(Exception):
    """replace_record found another version than the one it was given: someone replaced the
    record meanwhile (a session's concurrent append: answer 409, or read again and retry)."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the record is at version {version}")
        self.version = version


class RecordLimitReached(Exception):
    """create_record found `max_count` live records in the namespace."""

    def __init__(self, max_count: int) -> None:
        super().__init__(f"{max_count} records already")
        self.max_count = max_count


def valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def check_name(what: str, name: str) -> None:
    if not valid_name(name):
        raise ValueError(f"a record {what} must match {NAME_PATTERN.pattern}, got {name!r}")


class FileRecords:
    """Records under `self.directory` / records (the class using this mixin sets directory)."""

    directory: Path

    def _namespace(self, namespace: str) -> Path:
        check_name("namespace", namespace)
        return self.directory / _RECORDS / namespace

    def _record_path(self, namespace: str, key: str) -> Path:
        return self._namespace(namespace) / (key + _RECORD_SUFFIX)

    def create_record(
        self, namespace: str, key: str, value: bytes, *, ttl_s: float, max_count: int = 0
    ) -> Record | None:
        """Write a new record; None when the key is taken. RecordLimitReached when the namespace
        already holds max_count live records (0 = no bound); expired ones do not count."""
        check_name("key", key)
        path = self._record_path(namespace, key)
        with _locked(path.parent):
            if _read_record(path) is not None:
                return None
            if max_count and _live_records(path.parent) >= max_count:
                raise RecordLimitReached(max_count)
            return _write_record(path, value, 1, ttl_s)

    def get_record(self, namespace: str, key: str) -> Record | None:
        """The live record, or None (unknown, expired, deleted, or a malformed key)."""
        if not valid_name(key):
            return None
        return _read_record(self._record_path(namespace, key))

    def replace_record(
        self, namespace: str, key: str, value: bytes, *, version: int, ttl_s: float
    ) -> Record | None:
        """Compare-and-set: write value (and a new time to live) if the record is still at
        `version`; the new record, None when it is gone, VersionConflict when it moved on."""
        if not valid_name(key):
            return None
        path = self._record_path(namespace, key)
        with _locked(path.parent):
            current = _read_record(path)
            if current is None:
                return None
            if current.version != version:
                raise VersionConflict(current.version)
            return _write_record(path, value, version + 1, ttl_s)

    def delete_record(self, namespace: str, key: str) -> bool:
        """Remove a record; whether it was there (and live)."""
        if not valid_name(key):
            return False
        path = self._record_path(namespace, key)
        with _locked(path.parent):
            live = _read_record(path) is not None
            _unlink(path)
            return live

    def count_records(self, namespace: str) -> int:
        """Live records in the namespace (expired ones are deleted on the way)."""
        directory = self._namespace(namespace)
        with _locked(directory):
            return _live_records(directory)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _live_records(directory: Path) -> int:
    """Live records in directory; expired ones are deleted on the way (under its lock)."""
    live = 0
    for path in directory.glob("*" + _RECORD_SUFFIX):
        if _read_record(path) is None:
            _unlink(path)
        else:
            live += 1
    return live


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
    tmp = path.with_name(f".tmp-{secrets.token_hex(8)}")
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(version, expires_at) + value)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return Record(value, version, expires_at)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
