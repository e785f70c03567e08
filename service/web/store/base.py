"""The state store's interface: what the service keeps beyond one request, whichever backend
keeps it.

- Heatmaps: PNGs (and the SVG of a real model's picture) under unguessable ids, expiring
  ATTN_HEATMAP_TTL_S after they were made.
- Records: small versioned values under a namespace and a key, with a time to live (the state of
  a session). `create_record` writes only if the key is free and the namespace holds fewer than
  `max_count` live records; `replace_record` is a compare-and-set on the version, so a
  read-compute-replace cycle (appending a segment to a session) is atomic: of two concurrent
  replacements of one version, one wins and the other gets VersionConflict, and nothing is lost
  or reordered.
- Rate budgets: the rate limiter that fits the backend (per process on files, one budget per
  caller across replicas on Redis).

Operations on a store that cannot be reached raise StoreUnavailable (503 with Retry-After),
never a miss: an image or record that may exist is not reported as absent.
"""

from __future__ import annotations

import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.core.errors import LimitError
from service.web.ratelimit import RateLimiter

# What the package (service.web.store) offers its callers.
__all__ = [
    "ID_PATTERN",
    "PNG",
    "SVG",
    "Record",
    "RecordLimitReached",
    "Store",
    "StoreHealth",
    "StoredImage",
    "VersionConflict",
]

# secrets.token_urlsafe(16): 22 characters of the URL-safe base64 alphabet (128 random bits).
_ID_BYTES = 16
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
# A record's namespace and key: what a URL path segment or a file name can hold safely.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
# Every image is a PNG; the real model's pictures also have an SVG under the same id.
PNG, SVG = ".png", ".svg"
SUFFIXES = (PNG, SVG)


@dataclass(frozen=True)
class StoredImage:
    data: bytes
    expires_at: float  # Unix time

    def remaining_ttl(self) -> int:
        return max(0, int(self.expires_at - time.time()))


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


@dataclass(frozen=True)
class StoreHealth:
    """What /readyz says about the store: ready or the reason not, and facts to show."""

    ok: bool
    facts: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def new_ids(n: int) -> list[str]:
    return [secrets.token_urlsafe(_ID_BYTES) for _ in range(n)]


def valid_id(image_id: str) -> bool:
    # Only ids that put_images could have made ever reach the backend (no path traversal).
    return ID_PATTERN.fullmatch(image_id) is not None


def valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def check_name(what: str, name: str) -> None:
    if not valid_name(name):
        raise ValueError(f"a record {what} must match {NAME_PATTERN.pattern}, got {name!r}")


def _may_exist(namespace: str, key: str) -> bool:
    """Whether a record could be stored under `key` (no record has a malformed key); a
    malformed namespace is the caller's bug: ValueError."""
    if not valid_name(key):
        return False
    check_name("namespace", namespace)
    return True


class Store(ABC):
    """Heatmaps, records and rate budgets; see the module's docstring for the contract."""

    backend: str  # "files" or "redis", as /readyz shows it

    def __init__(self, max_bytes: int, max_count: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.ttl_s = ttl_s

    # -- life and health ------------------------------------------------------------------

    def open(self) -> None:  # noqa: B027 - a hook; a backend with nothing to do keeps it
        """At startup: prepare what the backend needs. Never fails the startup when the store
        is unreachable (health() reports it)."""

    def close(self) -> None:  # noqa: B027 - as open()
        """At shutdown: release connections."""

    @abstractmethod
    def health(self) -> StoreHealth:
        """Whether the store can be used now (it is probed, within a few seconds)."""

    def check_available(self) -> None:  # noqa: B027 - files are always there
        """Raise StoreUnavailable at once when the store is known to be unreachable, before a
        request computes something it could not keep. No round trip."""

    # -- heatmaps -------------------------------------------------------------------------

    def check_fits(self, files: list[bytes], images: int) -> None:
        """One request's images must fit the store on their own (LimitError, 413)."""
        incoming = sum(len(data) for data in files)
        if incoming > self.max_bytes or len(files) > self.max_count:
            raise LimitError(
                "heatmap",
                f"{images} images of {incoming} bytes do not fit the heatmap store "
                f"(ATTN_HEATMAP_MAX_COUNT={self.max_count}, "
                f"ATTN_HEATMAP_MAX_BYTES={self.max_bytes}); ask for fewer or inline images",
            )

    # The public operations check what they are given, the same for every backend, and hand
    # the backend's method (the same name with a leading underscore) only well-formed ids and
    # names.

    def put_images(self, images: list[bytes], svgs: list[bytes] | None = None) -> list[str]:
        """Store PNGs (and the SVG of each, when given); returns their new ids."""
        ids = new_ids(len(images))
        files = [(i, PNG, data) for i, data in zip(ids, images, strict=True)]
        if svgs is not None:
            files += [(i, SVG, data) for i, data in zip(ids, svgs, strict=True)]
        self.check_fits([data for _, _, data in files], len(images))
        self._put_files(files)
        return ids

    @abstractmethod
    def _put_files(self, files: list[tuple[str, str, bytes]]) -> None:
        """Write each (id, suffix, data); together they fit the store (check_fits)."""

    def put_image(self, data: bytes) -> str:
        return self.put_images([data])[0]

    def get_image(self, image_id: str, suffix: str = PNG) -> StoredImage | None:
        """The image (".png", or ".svg"), or None when the id is malformed, unknown or expired,
        or has no such format."""
        if not valid_id(image_id) or suffix not in SUFFIXES:
            return None
        return self._get_image(image_id, suffix)

    @abstractmethod
    def _get_image(self, image_id: str, suffix: str) -> StoredImage | None: ...

    # -- records --------------------------------------------------------------------------

    def create_record(
        self, namespace: str, key: str, value: bytes, *, ttl_s: float, max_count: int = 0
    ) -> Record | None:
        """Write a new record; None when the key is taken. RecordLimitReached when the namespace
        already holds max_count live records (0 = no bound); expired ones do not count."""
        check_name("key", key)
        check_name("namespace", namespace)
        return self._create_record(namespace, key, value, ttl_s=ttl_s, max_count=max_count)

    @abstractmethod
    def _create_record(
        self, namespace: str, key: str, value: bytes, *, ttl_s: float, max_count: int
    ) -> Record | None: ...

    def get_record(self, namespace: str, key: str) -> Record | None:
        """The live record, or None (unknown, expired, deleted, or a malformed key)."""
        return self._get_record(namespace, key) if _may_exist(namespace, key) else None

    @abstractmethod
    def _get_record(self, namespace: str, key: str) -> Record | None: ...

    def replace_record(
        self, namespace: str, key: str, value: bytes, *, version: int, ttl_s: float
    ) -> Record | None:
        """Compare-and-set: write value (and a new time to live) if the record is still at
        `version`; the new record, None when it is gone, VersionConflict when it moved on."""
        if not _may_exist(namespace, key):
            return None
        return self._replace_record(namespace, key, value, version=version, ttl_s=ttl_s)

    @abstractmethod
    def _replace_record(
        self, namespace: str, key: str, value: bytes, *, version: int, ttl_s: float
    ) -> Record | None: ...

    def delete_record(self, namespace: str, key: str) -> bool:
        """Remove a record; whether it was there."""
        return self._delete_record(namespace, key) if _may_exist(namespace, key) else False

    @abstractmethod
    def _delete_record(self, namespace: str, key: str) -> bool: ...

    def count_records(self, namespace: str) -> int:
        """Live records in the namespace."""
        check_name("namespace", namespace)
        return self._count_records(namespace)

    @abstractmethod
    def _count_records(self, namespace: str) -> int: ...

    # -- rate budgets ---------------------------------------------------------------------

    @abstractmethod
    def rate_limiter(
        self, per_minute: int, burst: int, on_fail_open: Callable[[], None]
    ) -> RateLimiter:
        """A limiter whose budgets live where this backend keeps state. `on_fail_open` is
        called for each request allowed because the budgets could not be reached."""
