"""Every setting of the HTTP service, read from the environment (prefix ATTN_), in one place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1 << 20


def _cores() -> int:
    # Cores this process may run on (a container's cpuset), not the host's count.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Service settings; each field is read from ATTN_<NAME> (e.g. ATTN_PORT=9000)."""

    model_config = SettingsConfigDict(env_prefix="ATTN_", extra="ignore", frozen=True)

    # Server (used by the `attention-service` console script).
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    workers: int = Field(1, ge=1, description="Worker processes (uvicorn --workers).")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"
    access_log: bool = Field(True, description="Log one line per request (uvicorn access log).")

    # Compute admission: at most max_concurrency computations run at once; up to queue_size
    # more wait; beyond that requests get 503 + Retry-After at once.
    # Per worker process: by default the cores are shared out among the workers.
    max_concurrency: int = Field(
        default_factory=lambda data: max(1, _cores() // data.get("workers", 1)), ge=1
    )
    queue_size: int = Field(64, ge=0)
    retry_after_s: int = Field(1, ge=0, description="Retry-After sent with a 503.")
    threads_per_computation: int = Field(
        0,
        ge=0,
        description="Native threads per computation; 0 = cores / (max_concurrency * workers).",
    )

    inline_max_bytes: int = Field(
        256 * 1024,
        ge=0,
        description="Request bodies up to this size are parsed on the event loop, and their "
        "computation runs there too when it is small (at most 2^25 flops and 2^16 answered "
        "numbers, no heatmaps: a 128x64 attention sent as b64) instead of hopping to a worker "
        "thread; such a request never waits in the queue. 0 = always a worker thread.",
    )

    request_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Most seconds a request may spend in the scheduler (queued plus "
        "computing) before it is answered 504; 0 = no limit.",
    )

    # Access: API keys, rate limit, CORS. Lists are comma-separated in the environment.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="Bearer keys accepted on /v1 and /v2; empty = no authentication."
    )
    rate_limit: int = Field(
        0,
        ge=0,
        description="Compute requests per minute per API key (per client IP without "
        "keys); per process with the file store, one budget across replicas on Redis; "
        "0 = no limit.",
    )
    rate_limit_burst: int = Field(
        0, ge=0, description="Requests a key may make at once; 0 = a minute's worth."
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Origins allowed to call the API from a browser ('*' = any); empty = CORS off.",
    )

    # Input limits.
    max_body_bytes: int = Field(64 * MiB, ge=1)
    body_timeout_s: float = Field(
        60.0,
        ge=0,
        description="Most seconds a client may take to send a request body, counted from its "
        "headers (408 after that: a stalled or trickling body cannot hold a connection); "
        "0 = no limit.",
    )
    max_elements: int = Field(
        1 << 24, ge=1, description="Elements per tensor, inputs and outputs (weights included)."
    )
    max_weight_elements: int = Field(
        1 << 24, ge=1, description="Total elements of the multi-head projection weights."
    )
    # Cost of one computation, from service.core.cost's model, checked before it starts.
    max_flops: int = Field(
        1 << 42,
        ge=1,
        description="Work one computation may need, in multiply-add-equivalent flops, set-up "
        "included (4.4e12: about a minute on one core).",
    )
    max_work_bytes: int = Field(
        1 << 30,
        ge=1,
        description="Memory one computation may allocate (its results, intermediates and "
        "set-up; not its inputs).",
    )

    # Heatmaps.
    heatmap_dir: Path = Field(
        default_factory=lambda: Path(tempfile.gettempdir()) / "attention-service-heatmaps"
    )
    heatmap_max_bytes: int = Field(256 * MiB, ge=0)
    heatmap_max_count: int = Field(1000, ge=0)
    heatmap_ttl_s: int = Field(3600, ge=1)
    heatmap_max_side: int = Field(1024, ge=1, description="Most query or key positions drawn.")
    heatmap_max_images: int = Field(64, ge=1, description="Most images one request may ask for.")

    # Shared state: Redis instead of the heatmap directory (heatmaps, sessions, rate budgets).
    redis_url: SecretStr = Field(
        SecretStr(""),
        description="redis://[:password@]host:port/db (or rediss://, unix://): keep heatmaps, "
        "sessions and rate budgets in Redis, shared by every replica; empty = the heatmap "
        "directory (and per-process rate budgets).",
    )
    redis_prefix: str = Field(
        "attn:", description="Prefix of every Redis key the service writes (to share a Redis)."
    )
    redis_timeout_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds to connect to Redis and for one command, before it counts as "
        "unreachable.",
    )

    # Ray Serve (`attention-service ray`; the `ray` extra).
    ray_replicas: int = Field(1, ge=1, description="Replicas of the Ray Serve deployment.")
    ray_replica_cpus: float = Field(
        0.5,
        gt=0,
        description="CPUs Ray reserves per replica; fractional, so that distributed_attention's "
        "tasks still find CPUs on a small cluster.",
    )
    ray_task_cpus: float = Field(
        0.5,
        gt=0,
        le=1024,
        description="CPUs Ray reserves per task of a `chunks` request (one kernel thread each, "
        "or one per whole CPU); fractional, so that a task finds room beside a replica even on "
        "a node of one CPU.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    # Memory sessions (/v1/sessions and /v2 sequences), kept in the heatmap store's backend.
    session_ttl_s: int = Field(
        3600,
        ge=1,
        description="Seconds a session lives after its last segment (the default and the most "
        "a session may ask for).",
    )
    session_max: int = Field(
        1000, ge=1, description="Live sessions and /v2 sequences at most (503 beyond)."
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        # "a, b,," -> ("a", "b"): the environment form; sequences pass through.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @property
    def native_threads(self) -> int:
        """Threads one computation uses: the explicit setting, else a fair share of the cores."""
        if self.threads_per_computation:
            return self.threads_per_computation
        return max(1, _cores() // (self.max_concurrency * self.workers))
