"""The app's two ASGI middlewares: the request body limit and the metrics of every request.

Pure ASGI (cheaper than BaseHTTPMiddleware); the app factory adds them (service.web.app).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.web.metrics import Metrics
from service.web.problems import BodyTimeout, BodyTooLarge, ErrorForms, MalformedBody


class BodyLimitMiddleware:
    """413 for bodies over max_bytes, before they are read whole; 408 for bodies too slow.

    A declared Content-Length over the limit is refused without reading a byte; a body without
    one (chunked) is counted as it streams and refused as soon as it passes the limit. The whole
    body must arrive within timeout_s of the request's start (0: no limit), so that a client
    that stalls or trickles cannot hold a connection and a worker forever.
    """

    def __init__(
        self, app: ASGIApp, forms: ErrorForms, max_bytes: int, timeout_s: float = 0
    ) -> None:
        self.app = app
        self.forms = forms
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
                    message = await _within(receive(), deadline)
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

    async def _refuse(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        error = BodyTooLarge if status == 413 else MalformedBody
        response = self.forms.answer(
            scope.get("path", ""),
            status,
            detail,
            title=error.title,
            slug=error.slug,
            headers={"Connection": "close"},
        )
        await response(scope, _no_receive, send)


async def _within(receive: Awaitable[Message], deadline: float) -> Message:
    """`await receive` until `deadline` (time.monotonic()), else asyncio.TimeoutError.

    asyncio.timeout_at (Python 3.11) only schedules a timer; wait_for also wraps the read in a
    task of its own, which costs more than the read when the bytes are already there (several
    reads per request body)."""
    timeout_at = getattr(asyncio, "timeout_at", None)
    if timeout_at is None:  # Python 3.10
        return await asyncio.wait_for(receive, deadline - time.monotonic())
    loop = asyncio.get_running_loop()
    async with timeout_at(loop.time() + (deadline - time.monotonic())):
        return await receive


async def _no_receive() -> Message:  # pragma: no cover - a plain Response never reads
    return {"type": "http.disconnect"}


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): count and time every request."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            # The route template, not the path: heatmap ids must not become label values.
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
