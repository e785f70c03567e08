"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import wire
from service.problems import PROBLEM_MEDIA_TYPE, NotReady
from service.schemas import Health, Readiness
from service.state import app_state

router = APIRouter(tags=["operations"])


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
def readyz(request: Request) -> Response:
    """Ready when the native module is loaded and the heatmap store is writable."""
    state = app_state(request)
    try:
        from service import _native

        native = {
            "version": _native.version(),
            "isa": _native.isa(),
            "threads_per_computation": state.num_threads,
        }
    except Exception as exc:  # an ImportError or a broken build: not ready, never a 500
        raise NotReady(f"the native module is not usable: {exc}") from None
    writable = state.store.writable()
    if not writable:
        raise NotReady(f"the heatmap store {state.store.directory} is not writable")
    store = {"directory": str(state.store.directory), "writable": True}
    return wire.json_response({"status": "ready", "native": native, "store": store})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
)
def metrics(request: Request) -> Response:
    """Request counts and latencies per route, compute time per job, queue state."""
    m = app_state(request).metrics
    return Response(m.render(), media_type=m.content_type)
