"""The FastAPI app: create_app(settings) wires settings, compute core, store, metrics and routes."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.compute import ComputeCore
from service.heatmaps import render_map
from service.inference_protocol import ErrorResponse, ProtocolErrorMiddleware
from service.limits import Limits
from service.metrics import Metrics, MetricsMiddleware
from service.model_schemas import ModelTokensRequest
from service.problems import (
    BodyTimeout,
    BodyTooLarge,
    Problem,
    install_problem_handlers,
    problem_response,
)
from service.routes import API_ROUTERS, OPEN_ROUTERS, v2, viewer
from service.routes.docs import install_docs
from service.schemas import REQUEST_MODELS, add_component_schemas
from service.security import GUARD_RESPONSES, AccessControl, authorize
from service.settings import Settings
from service.state import AppState
from service.store import HeatmapStore

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


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, before they are read whole; 408 for bodies too slow.

    A declared Content-Length over the limit is refused without reading a byte; a body without
    one (chunked) is counted as it streams and refused as soon as it passes the limit. The whole
    body must arrive within timeout_s of the request's start (0: no limit), so that a client
    that stalls or trickles cannot hold a connection and a worker forever.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, what: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"the request body {what} the limit of {self.max_bytes} bytes (ATTN_MAX_BODY_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length < 0:
                await self._refuse(scope, send, 400, "Content-Length is not a valid length")
                return
            if length > self.max_bytes:
                exc = self._too_large(f"declares {length} bytes, over")
                await self._refuse(scope, send, 413, exc.detail)
                return
        received = 0
        deadline = time.monotonic() + self.timeout_s if self.timeout_s > 0 else math.inf
        body_done = False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done or deadline == math.inf:
                # Later reads only wait for a disconnect: never timed.
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), deadline - time.monotonic())
                except asyncio.TimeoutError:  # not the builtin before Python 3.11
                    # Raised inside the route's body read; the problem handler answers 408.
                    raise BodyTimeout(
                        f"the request body did not arrive within {self.timeout_s:g} s "
                        f"(ATTN_BODY_TIMEOUT_S); {received} bytes came",
                        headers={"Connection": "close"},
                    ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    # Raised inside the route's body read; the problem handler answers 413.
                    raise self._too_large("exceeds")
            return message

        await self.app(scope, limited_receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
        slug = "body-too-large" if status == 413 else "malformed-body"
        title = "Request body too large" if status == 413 else "Malformed request body"
        response = problem_response(
            status,
            detail,
            title=title,
            slug=slug,
            instance=scope.get("path"),
            headers={"Connection": "close"},
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - a plain Response never reads
    return {"type": "http.disconnect"}


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (default: from the ATTN_ environment)."""
    settings = settings or Settings()
    metrics = Metrics()
    core = ComputeCore(
        settings.max_concurrency,
        settings.queue_size,
        settings.retry_after_s,
        observer=metrics,
        timeout_s=settings.request_timeout_s,
    )
    metrics.track_core(lambda: core.running, lambda: core.queued)
    store = HeatmapStore(
        settings.heatmap_dir,
        settings.heatmap_max_bytes,
        settings.heatmap_max_count,
        settings.heatmap_ttl_s,
    )
    state = AppState(settings, Limits.from_settings(settings), core, store, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            store.open()
        except OSError as exc:  # /readyz reports it; the API still computes without images
            log.warning("heatmap store %s unusable: %s", store.directory, exc)
        # Load fonts and matplotlib's caches once, in a worker, before the first request.
        warm = partial(render_map, np.eye(2, dtype=np.float32), title="warm-up")
        await core.run("warmup", warm, timeout_s=math.inf)
        yield
        core.close()

    app = FastAPI(
        title="Attention service",
        version="0.1.0",
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served from the package by install_docs, not from a CDN
        redoc_url=None,
    )
    app.state.services = state
    access = app.state.access = AccessControl.from_settings(settings)
    install_problem_handlers(app)
    guard = [Depends(authorize)]  # API keys and rate limit; a no-op when neither is set
    for router in API_ROUTERS:
        app.include_router(router, dependencies=guard, responses=GUARD_RESPONSES)
    # The Open Inference Protocol (KServe v2 / Triton) front; its health probes stay open.
    v2_guard_responses = {
        status: {"description": r["description"], "model": ErrorResponse}
        for status, r in GUARD_RESPONSES.items()
    }
    app.include_router(v2.router, dependencies=guard, responses=v2_guard_responses)
    for router in (*OPEN_ROUTERS, v2.health_router):
        app.include_router(router)
    app.include_router(viewer.router)  # the web viewer at / and its files under /static/
    install_docs(app)
    # The last added is the outermost: metrics see every answer, 413s included.
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s
    )
    # /v2 answers errors as {"error": ...}, the protocol's form, not problem+json.
    app.add_middleware(ProtocolErrorMiddleware)
    if settings.cors_origins:
        # Outside the error translation, so that every answer (401, 429, 503...) carries the
        # CORS headers; preflights are answered here, before authentication.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=_CORS_HEADERS,
            expose_headers=_CORS_EXPOSED,
            max_age=600,
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    def openapi() -> dict[str, Any]:
        # Routes parse their bodies themselves (orjson + numpy); their schemas are added here.
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            add_component_schemas(schema, (*REQUEST_MODELS, ModelTokensRequest, Problem))
            if not access.keys.enabled:
                # Started without keys: {} (no credentials) is an accepted alternative.
                for operations in schema["paths"].values():
                    for op in operations.values():
                        if isinstance(op, dict) and "security" in op:
                            op["security"].append({})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
