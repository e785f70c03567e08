"""What the routes share, built once per app (AppState), and the dependencies that hand it to
them: a route declares `state: StateDep` (FastAPI's Annotated[..., Depends(...)] style), and
create_app puts `authorize` in front of the API routers."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Literal

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from service.web.limits import Limits
from service.web.metrics import Metrics
from service.web.scheduler import Scheduler
from service.web.security import AccessControl, bearer
from service.web.settings import Settings
from service.web.store import Store


@dataclass(frozen=True)
class Replica:
    """The process serving: an id a client can tell replicas apart by (Ray Serve's replica id,
    else host and pid) and what runs it (uvicorn, or a Ray Serve replica)."""

    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    pid: int = field(default_factory=os.getpid)
    server: Literal["uvicorn", "ray"] = "uvicorn"


@dataclass(frozen=True)
class AppState:
    settings: Settings
    limits: Limits
    scheduler: Scheduler
    store: Store
    metrics: Metrics
    access: AccessControl
    replica: Replica

    @cached_property
    def num_threads(self) -> int:
        # Cached: the settings compute it from the CPU affinity (a system call per request).
        return self.settings.native_threads


# async: FastAPI would run a plain function in its thread pool, a hop for a dictionary lookup.
async def app_state(request: Request) -> AppState:
    return request.app.state.services


async def state_store(request: Request) -> Store:
    return request.app.state.services.store


StateDep = Annotated[AppState, Depends(app_state)]
StoreDep = Annotated[Store, Depends(state_store)]


async def authorize(
    request: Request,
    state: StateDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> str:
    """The dependency guarding the API: 401 without a valid key, 429 over the rate limit."""
    caller = state.access.caller(request, credentials)
    limiter = state.access.limiter
    if limiter is not None and limiter.remote:
        # A round trip to Redis (up to ATTN_REDIS_TIMEOUT_S when it hangs): not on the loop.
        await run_in_threadpool(state.access.charge, request, caller)
    else:
        state.access.charge(request, caller)
    return caller
