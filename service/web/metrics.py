"""Prometheus metrics, each app with its own registry (so several apps can live in one process)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Request counts and latencies per route, compute time per job, queue state."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "attention_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "attention_http_request_duration_seconds",
            "Time from request start to the end of the response, by route template.",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute = Histogram(
            "attention_compute_seconds",
            "Time a job spent in a compute worker (parse, compute, render, encode).",
            ["job"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "attention_compute_rejected",
            "Jobs refused with 503 because the compute queue was full.",
            ["job"],
            registry=self.registry,
        )
        self.abandoned = Counter(
            "attention_compute_abandoned",
            "Jobs given up because the client disconnected, the request timed out "
            "(ATTN_REQUEST_TIMEOUT_S) or the server stopped; queued ones never ran.",
            ["job", "reason"],
            registry=self.registry,
        )
        self.rate_limit_fail_open = Counter(
            "attention_rate_limit_fail_open",
            "Requests allowed without a rate budget because the store keeping the budgets "
            "(Redis) was unreachable.",
            registry=self.registry,
        )
        self._running = Gauge(
            "attention_compute_running", "Jobs running now.", registry=self.registry
        )
        self._queued = Gauge(
            "attention_compute_queued", "Jobs waiting for a worker.", registry=self.registry
        )

    def track_scheduler(self, running: Callable[[], float], queued: Callable[[], float]) -> None:
        """Read the scheduler's gauges at scrape time instead of updating them per job."""
        self._running.set_function(running)
        self._queued.set_function(queued)

    def observe_compute(self, job: str, seconds: float) -> None:
        self.compute.labels(job).observe(seconds)

    def observe_rejected(self, job: str) -> None:
        self.rejected.labels(job).inc()

    def observe_abandoned(self, job: str, reason: str) -> None:
        self.abandoned.labels(job, reason).inc()

    def observe_fail_open(self) -> None:
        self.rate_limit_fail_open.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
