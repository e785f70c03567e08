"""Liveness, readiness (with the version) and Prometheus metrics; open to everyone."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.responses import Response

from service import _native
from service.core.version import VERSION
from service.web import wire
from service.web.deps import AppState, StateDep
from service.web.docs import example_config
from service.web.problems import PROBLEM_MEDIA_TYPE, NotReady

router = APIRouter(tags=["operations"])


class Health(BaseModel):
    model_config = example_config({"status": "ok"})

    status: Literal["ok"]


class Readiness(BaseModel):
    model_config = example_config(
        {
            "status": "ready",
            "version": "0.1.0",
            "native": {"version": "0.1.0", "isa": "avx2", "threads_per_computation": 1},
            "store": {"backend": "redis", "url": "redis://redis:6379/0", "connected": True},
            "replica": {"id": "host-4242", "pid": 4242, "server": "uvicorn"},
        },
    )

    status: Literal["ready"]
    version: str
    native: dict[str, Any]
    store: dict[str, Any] = Field(
        description='The state store: {"backend": "files", "directory", "writable"} or '
        '{"backend": "redis", "url" (no password), "connected"}.'
    )
    replica: dict[str, Any] = Field(
        description="Which process answered: its id (Ray Serve's replica id, else host and "
        "pid), pid and server (uvicorn or ray)."
    )


def _native_facts(state: AppState) -> dict[str, Any]:
    return {
        "version": _native.__version__,  # the package's: pyproject.toml, through CMake
        "isa": _native.isa(),
        "threads_per_computation": state.num_threads,
    }


def not_ready(state: AppState) -> str | None:
    """Why the service cannot serve every request (native module unusable, state store not
    writable or unreachable), or None. Probes the store: a few seconds at most."""
    try:
        _native_facts(state)
    except Exception as exc:  # a broken build: not ready, never a 500
        return f"the native module is not usable: {exc}"
    return state.store.health().reason


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Response:
    """The process answers."""
    return wire.json_response({"status": "ok"})


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness",
    responses={
        503: {
            "description": "Not ready: native module missing, or the state store not writable "
            "(files) or unreachable (Redis).",
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    },
)
def readyz(state: StateDep) -> Response:
    """Ready when the native module is loaded and the state store usable: the heatmap
    directory writable, or Redis answering (probed on each call, answered within seconds)."""
    try:
        native = _native_facts(state)
    except Exception as exc:  # a broken build: not ready, never a 500
        raise NotReady(f"the native module is not usable: {exc}") from None
    store = state.store.health()
    if not store.ok:
        raise NotReady(store.reason or "the state store is not usable")
    replica = state.replica
    return wire.json_response(
        {
            "status": "ready",
            "version": VERSION,
            "native": native,
            "store": store.facts,
            "replica": {"id": replica.id, "pid": replica.pid, "server": replica.server},
        }
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
def metrics(state: StateDep) -> Response:
    """Request counts and latencies per route, compute time per job, queue state."""
    m = state.metrics
    return Response(m.render(), media_type=m.content_type)
