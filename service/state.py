"""What the routes share, built once per app: settings, limits, compute core, store, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from service.compute import ComputeCore
from service.limits import Limits
from service.metrics import Metrics
from service.settings import Settings
from service.store import HeatmapStore


@dataclass(frozen=True)
class AppState:
    settings: Settings
    limits: Limits
    core: ComputeCore
    store: HeatmapStore
    metrics: Metrics

    @property
    def num_threads(self) -> int:
        return self.settings.native_threads


def app_state(request: Request) -> AppState:
    return request.app.state.services
