"""The FastAPI app: create_app(settings) wires settings, scheduler, store, metrics and routers.

The only module (with the CLI, which names it to uvicorn) that brings the web layer together:
uvicorn runs `service.web.app:create_app` as a factory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import numpy as np
from fastapi import Depends, FastAPI
from starlette.middleware.cors import CORSMiddleware

from service.core.version import VERSION
from service.render.canvas import render_map
from service.web import health, v1, viewer
from service.web.deps import AppState, Replica, authorize
from service.web.docs import install_docs, install_openapi
from service.web.limits import Limits
from service.web.metrics import Metrics
from service.web.middleware import BodyLimitMiddleware, MetricsMiddleware
from service.web.problems import ErrorForms, Problem, install_problem_handlers
from service.web.scheduler import Scheduler
from service.web.security import GUARD_RESPONSES, AccessControl
from service.web.settings import Settings
from service.web.store import open_store
from service.web.v1.model_schemas import ModelTokensRequest
from service.web.v1.schemas import REQUEST_MODELS
from service.web.v1.session_schemas import REQUEST_MODELS as SESSION_MODELS
from service.web.v2 import routes as v2
from service.web.v2.datamodels import ErrorResponse
from service.web.v2.errors import error_response

log = logging.getLogger("service")

_DESCRIPTION = """\
Exact fused attention (a C++ kernel) over HTTP, with PNG heatmaps of the attention weights.

Tensors are nested lists of numbers, `{"dtype", "shape", "data": [flat]}` or
`{"dtype", "shape", "b64": base64 of little-endian C-order bytes}` (dtype float32, float64,
float16, bfloat16 or bool). Every error is RFC 9457 `application/problem+json`.

When the service is started with API keys (`ATTN_API_KEYS`), every `/v1` and `/v2` route needs
`Authorization: Bearer <key>` (401 otherwise); health, readiness, metrics, these docs and the
viewer page stay open.
"""

# Cross-origin browsers may send and read these (when ATTN_CORS_ORIGINS allows the origin).
_CORS_HEADERS = [
    "Authorization",
    "Content-Type",
    "Content-Encoding",
    "Inference-Header-Content-Length",
]
_CORS_EXPOSED = [
    "Retry-After",
    "WWW-Authenticate",
    "ETag",
    "Content-Encoding",
    "Inference-Header-Content-Length",
]


def _state(settings: Settings, replica: Replica) -> AppState:
    metrics = Metrics()
    scheduler = Scheduler(
        settings.max_concurrency,
        settings.queue_size,
        settings.retry_after_s,
        observer=metrics,
        timeout_s=settings.request_timeout_s,
        inline_max_bytes=settings.inline_max_bytes,
    )
    metrics.track_scheduler(lambda: scheduler.running, lambda: scheduler.queued)
    store = open_store(settings)
    access = AccessControl.from_settings(settings, store, metrics.observe_fail_open)
    limits = Limits.from_settings(settings)
    return AppState(settings, limits, scheduler, store, metrics, access, replica)


def create_app(settings: Settings | None = None, replica: Replica | None = None) -> FastAPI:
    """The app for `settings` (default: from the ATTN_ environment), served by `replica`
    (default: this process under uvicorn)."""
    settings = settings or Settings()
    state = _state(settings, replica or Replica())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            state.store.open()
        except OSError as exc:  # /readyz reports it; the API still computes without images
            log.warning("heatmap store unusable: %s", exc)
        # Load fonts and matplotlib's caches once, in a worker, before the first request.
        warm = partial(render_map, np.eye(2, dtype=np.float32), title="warm-up")
        await state.scheduler.run("warmup", warm, timeout_s=math.inf)
        yield
        state.scheduler.close()
        state.store.close()

    app = FastAPI(
        title="Attention service",
        version=VERSION,
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from the package by install_docs, not from a CDN
        redoc_url=None,
        # No trailing-slash redirects: Starlette builds their Location from the Host header the
        # client sent. "/v1/attention/" is a 404 like any other unknown path.
        redirect_slashes=False,
    )
    app.state.services = state
    # Errors are problem+json, except on /v2, which answers in the protocol's form.
    forms = ErrorForms()
    forms.add(v2.PREFIX, error_response)
    install_problem_handlers(app, forms)
    guard = [Depends(authorize)]  # API keys and rate limit; a no-op when neither is set
    for router in v1.ROUTERS:
        app.include_router(router, dependencies=guard, responses=GUARD_RESPONSES)
    # The Open Inference Protocol (KServe v2 / Triton) front; its health probes stay open.
    v2_guard_responses = {
        status: {"description": r["description"], "model": ErrorResponse}
        for status, r in GUARD_RESPONSES.items()
    }
    app.include_router(v2.router, dependencies=guard, responses=v2_guard_responses)
    app.include_router(health.router)
    app.include_router(v2.health_router)
    app.include_router(viewer.router)  # the web viewer at / and its files under /static/
    install_docs(app)
    # The last added is the outermost: metrics see every answer, 413s included.
    app.add_middleware(
        BodyLimitMiddleware,
        forms=forms,
        max_bytes=settings.max_body_bytes,
        timeout_s=settings.body_timeout_s,
    )
    if settings.cors_origins:
        # Outside the body limit, so that its answers carry the CORS headers too; preflights are
        # answered here, before authentication.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST", "DELETE"],
            allow_headers=_CORS_HEADERS,
            expose_headers=_CORS_EXPOSED,
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    install_openapi(
        app,
        (*REQUEST_MODELS, *SESSION_MODELS, ModelTokensRequest, Problem),
        keys=state.access.keys.enabled,
    )
    return app
