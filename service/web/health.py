"""Liveness, readiness (with the version) and Prometheus metrics; open to everyone."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel
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
            "store": {"directory": "/tmp/attention-service-heatmaps", "writable": True},
        },
    )

    status: Literal["ready"]
    version: str
    native: dict[str, Any]
    store: dict[str, Any]


def _native_facts(state: AppState) -> dict[str, Any]:
    return {
        "version": _native.__version__,  # the package's: pyproject.toml, through CMake
        "isa": _native.isa(),
        "threads_per_computation": state.num_threads,
    }


def not_ready(state: AppState) -> str | None:
    """Why the service cannot compute (native module unusable, store not writable), or None."""
    try:
        _native_facts(state)
    except Exception as exc:  # a broken build: not ready, never a 500
        return f"the native module is not usable: {exc}"
    if not state.store.writable():
        return f"the heatmap store {state.store.directory} is not writable"
    return None


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
            "description": "Not ready: native module missing or store not writable.",
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    },
)
def readyz(state: StateDep) -> Response:
    """Ready when the native module is loaded and the heatmap store is writable."""
    reason = not_ready(state)
    if reason:
        raise NotReady(reason)
    store = {"directory": str(state.store.directory), "writable": True}
    return wire.json_response(
        {"status": "ready", "version": VERSION, "native": _native_facts(state), "store": store}
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
