"""The state store: what the service keeps beyond one request (heatmaps, records such as
sessions, rate budgets), behind one interface (base.py) with two backends: files in a directory
(files.py, the embedded default) or Redis (redisstore.py, when ATTN_REDIS_URL is set), which
every replica shares. `open_store` picks the backend from the settings."""

from __future__ import annotations

from service.web.settings import Settings
from service.web.store import base
from service.web.store.base import *  # noqa: F403 - the interface, as base.__all__ lists it
from service.web.store.files import FileStore

__all__ = [*base.__all__, "FileStore", "open_store"]


def open_store(settings: Settings) -> base.Store:
    """The store the settings name: Redis when ATTN_REDIS_URL is set, else the directory."""
    if settings.redis_url:
        from service.web.store.redisstore import RedisStore  # the redis client, only when used

        return RedisStore(
            settings.redis_url.get_secret_value(),
            prefix=settings.redis_prefix,
            ttl_s=settings.heatmap_ttl_s,
            max_bytes=settings.heatmap_max_bytes,
            max_count=settings.heatmap_max_count,
            timeout_s=settings.redis_timeout_s,
            retry_after_s=settings.retry_after_s,
        )
    return FileStore(
        settings.heatmap_dir,
        settings.heatmap_max_bytes,
        settings.heatmap_max_count,
        settings.heatmap_ttl_s,
    )
