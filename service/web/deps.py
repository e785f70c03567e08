"""What the routes share, built once per app (AppState), and the dependencies that hand it to
them: a route declares `state: StateDep` (FastAPI's Annotated[..., Depends(...)] style), and
create_app puts `authorize` in front of the API routers."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials

from service.web.limits import Limits
from service.web.metrics import Metrics
from service.web.scheduler import Scheduler
from service.web.security import AccessControl, bearer
from service.web.settings import Settings
from service.web.store import HeatmapStore


@dataclass(frozen=True)
class AppState:
    settings: Settings
    limits: Limits
    scheduler: Scheduler
    store: HeatmapStore
    metrics: Metrics
    access: AccessControl

    @cached_property
    def num_threads(self) -> int:
        # Cached: the settings compute it from the CPU affinity (a system call per request).
        return self.settings.native_threads


# async: FastAPI would run a plain function in its thread pool, a hop for a dictionary lookup.
async def app_state(request: Request) -> AppState:
    return request.app.state.services


async def heatmap_store(request: Request) -> HeatmapStore:
    return request.app.state.services.store


StateDep = Annotated[AppState, Depends(app_state)]
StoreDep = Annotated[HeatmapStore, Depends(heatmap_store)]


async def authorize(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> str:
    """The dependency guarding the API: 401 without a valid key, 429 over the rate limit."""
    caller = state.access.caller(request, credentials)
    state.access.charge(request, caller)
    return caller
