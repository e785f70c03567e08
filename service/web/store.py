"""The heatmap store: PNG files under unguessable ids, bounded in bytes, count and age.

Several processes (uvicorn workers, replicas on one volume) may share the directory: files are
written to a temporary name and renamed into place (atomic), and eviction and writing run under
an advisory file lock, so the limits hold across writers: the stored images never exceed
max_bytes or max_count (an interrupted writer's temporary file is removed after a minute).
The directory itself is the only state, so a restart loses nothing: an id listed before it is
served, or (expired, evicted) is a clean miss. Only files named like an id are ever counted or
deleted, so a directory shared with other files loses none of them. Records (a session's
state) live in the same directory, under records/ (service.web.records).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.core.errors import LimitError
from service.web.records import FileRecords, Record, RecordLimitReached, VersionConflict

__all__ = ["HeatmapStore", "Record", "RecordLimitReached", "StoredImage", "VersionConflict"]

# secrets.token_urlsafe(16): 22 characters of the URL-safe base64 alphabet (128 random bits).
_ID_BYTES = 16
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
# Every image is a PNG; the real model's pictures also have an SVG under the same id.
_SUFFIX = ".png"
_SUFFIXES = (".png", ".svg")
_LOCK_NAME = ".lock"


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    mtime: float


class HeatmapStore(FileRecords):
    """put(png) -> id; get(id) -> bytes or None. Old and excess images are evicted on put.
    Records: see service.web.records."""

    def __init__(self, directory: Path, max_bytes: int, max_count: int, ttl_s: float) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.ttl_s = ttl_s

    def open(self) -> None:
        """Create the directory and bring it within the limits (at startup; they may be lower
        than the last run's)."""
        with self._locked():
            self._evict(incoming_bytes=0, incoming_count=0)

    @staticmethod
    def valid_id(image_id: str) -> bool:
        # Only ids that put() could have made ever reach the filesystem (no path traversal).
        return ID_PATTERN.fullmatch(image_id) is not None

    def _path(self, image_id: str, suffix: str = _SUFFIX) -> Path:
        return self.directory / (image_id + suffix)

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

    def put_many(self, images: list[bytes], svgs: list[bytes] | None = None) -> list[str]:
        """Store PNGs (and the SVG of each, when given); returns their ids. Evicts first so
        the limits hold after writing (an SVG counts as a file of its own)."""
        ids = [secrets.token_urlsafe(_ID_BYTES) for _ in images]
        files = [(self._path(i), data) for i, data in zip(ids, images, strict=True)]
        if svgs is not None:
            files += [(self._path(i, ".svg"), data) for i, data in zip(ids, svgs, strict=True)]
        incoming = sum(len(data) for _, data in files)
        if incoming > self.max_bytes or len(files) > self.max_count:
            raise LimitError(
                "heatmap",
                f"{len(images)} images of {incoming} bytes do not fit the heatmap store "
                f"(ATTN_HEATMAP_MAX_COUNT={self.max_count}, "
                f"ATTN_HEATMAP_MAX_BYTES={self.max_bytes}); ask for fewer or inline images",
            )
        with self._locked():
            self._evict(incoming_bytes=incoming, incoming_count=len(files))
            for path, data in files:
                self._write_atomic(path, data)
        return ids

    def put(self, data: bytes) -> str:
        return self.put_many([data])[0]

    def get(self, image_id: str, suffix: str = _SUFFIX) -> StoredImage | None:
        """The image (".png", or ".svg"), or None when the id is malformed, unknown or
        expired, or has no such format."""
        if not self.valid_id(image_id) or suffix not in _SUFFIXES:
            return None
        path = self._path(image_id, suffix)
        try:
            with open(path, "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime
                if time.time() - mtime > self.ttl_s:
                    return None
                return StoredImage(f.read(), mtime)
        except OSError:  # unknown, or evicted meanwhile
            return None

    def remaining_ttl(self, image: StoredImage) -> int:
        return max(0, int(image.mtime + self.ttl_s - time.time()))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".tmp-{secrets.token_hex(8)}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

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
                        self._unlink(entry.path)
                    continue
                stem, dot, ext = name.rpartition(".")
                if not (dot and "." + ext in _SUFFIXES and self.valid_id(stem)):
                    continue
                if now - st.st_mtime > self.ttl_s:
                    self._unlink(entry.path)
                    continue
                entries.append((st.st_mtime, st.st_size, entry.path))
        entries.sort()
        total = sum(size for _, size, _ in entries) + incoming_bytes
        count = len(entries) + incoming_count
        for _, size, path in entries:
            if total <= self.max_bytes and count <= self.max_count:
                break
            self._unlink(path)
            total -= size
            count -= 1

    @staticmethod
    def _unlink(path: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)
