"""`attention-service ray`: the same FastAPI app, served by Ray Serve replicas.

Each replica builds the app itself (create_app, from the ATTN_ settings the launcher passes on
in the replicas' runtime environment), so every route, limit and error behaves as under
uvicorn; /readyz names the replica that answered. Ray Serve's HTTP proxy listens on
--host:--port on every node that runs a replica. The cluster is the one RAY_ADDRESS names, else
a local one started here (and stopped on exit). Replicas reserve a fraction of a CPU
(ATTN_RAY_REPLICA_CPUS), so that distributed_attention's tasks still find CPUs beside them.

Needs the `ray` extra (ray[serve]); nothing else imports Ray in the web layer.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from service.web.app import create_app
from service.web.deps import Replica
from service.web.settings import Settings

log = logging.getLogger("service")

APP_NAME = "attention-service"
DEPLOYMENT_NAME = "attention"


@dataclass(frozen=True)
class ServeOptions:
    """How to deploy: a fixed number of replicas, or autoscaling between bounds."""

    host: str
    port: int
    replicas: int
    replica_cpus: float
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    num_cpus: int | None = None  # CPUs of the local cluster (None: all cores)

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None


def build_app() -> Any:
    """Run by Ray Serve on each replica as it starts: the app, knowing which replica it is."""
    from ray import serve

    replica_id = serve.get_replica_context().replica_id.unique_id
    return create_app(Settings(), Replica(id=replica_id, server="ray"))


def _deployment_config(options: ServeOptions, settings: Settings) -> dict[str, Any]:
    # The replicas read their settings from the environment, on whichever node they run.
    env = {k: v for k, v in os.environ.items() if k.startswith("ATTN_")}
    config: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": options.replica_cpus, "runtime_env": {"env_vars": env}},
        # Ray Serve queues beyond this; the app's own scheduler answers 503 past its queue,
        # as under uvicorn, so let it see that many.
        "max_ongoing_requests": settings.max_concurrency + settings.queue_size,
        "health_check_period_s": 5,
    }
    if options.autoscaling:
        low = options.min_replicas if options.min_replicas is not None else 1
        high = options.max_replicas if options.max_replicas is not None else max(low, 1)
        config["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, min(options.replicas, high)),
            "max_replicas": high,
            "target_ongoing_requests": options.target_ongoing_requests,
        }
    else:
        config["num_replicas"] = options.replicas
    return config


def serve_forever(options: ServeOptions, settings: Settings) -> None:
    """Deploy on the cluster and serve until SIGINT or SIGTERM; then remove the deployment
    (and stop the local cluster when this process started it)."""
    import ray
    from ray import serve

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports (offline)
    address = os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    init: dict[str, Any] = {"address": address, "include_dashboard": False}
    if local and options.num_cpus is not None:
        init["num_cpus"] = options.num_cpus
    ray.init(**init)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        config = _deployment_config(options, settings)
        ingress = serve.deployment(**config)(serve.ingress(build_app)())
        serve.run(ingress.bind(), name=APP_NAME, route_prefix="/")
        cluster = "a local Ray cluster" if local else f"the Ray cluster at {address}"
        replicas = (
            f"{options.min_replicas or 1}..{options.max_replicas} replicas (autoscaling)"
            if options.autoscaling
            else f"{options.replicas} replicas"
        )
        print(
            f"attention-service: Ray Serve on {cluster}, {replicas}, "
            f"serving on http://{options.host}:{options.port}",
            flush=True,
        )
        stop.wait()
    finally:
        try:
            if local:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)  # leave the shared cluster's other applications alone
        finally:
            ray.shutdown()
