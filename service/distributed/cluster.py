"""Which Ray cluster: the one this process is already connected to (a Ray Serve replica, a
driver that called ray.init), else the one RAY_ADDRESS names, else a local one started here."""

from __future__ import annotations

import os
from typing import Any

import ray


def connect(num_cpus: int | None = None) -> Any:
    """The ray module, connected. num_cpus: CPUs of a local cluster, if one is started here."""
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports (offline)
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return ray
