"""Cooperative cancellation of a compute job whose answer nobody waits for any more.

The HTTP service's scheduler (service.web.scheduler) gives each job a CancelToken and binds it
to the worker thread while the job runs. When the client disconnects or the request times out,
the scheduler cancels the token; the job stops at its next `checkpoint()` (before the native
kernel, between heatmap images) instead of finishing work whose result would be thrown away.
Outside a compute worker (the Python API used directly) `checkpoint()` does nothing.

A native call already running is stopped too: each token owns a `_native.CancelFlag` that
`cancel()` sets, and service.core.native_call passes it to the kernel, whose workers stop taking
work items once it is set (the call then raises `_native.Cancelled`, which the API turns into
`Cancelled`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service import _native


class Cancelled(Exception):
    """Raised in a worker by `checkpoint()` once its job has been abandoned."""


class CancelToken:
    """Set once, from any thread; read by the job at its checkpoints."""

    __slots__ = ("_event", "flag", "reason")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.flag = _native.CancelFlag()  # read by a running native call, without the GIL
        self.reason = ""

    def cancel(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()
            self.flag.set()  # after the reason, so a stopped kernel's Cancelled carries it

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


_local = threading.local()


@contextmanager
def bound(token: CancelToken) -> Iterator[None]:
    """Make `token` the current thread's token for the duration of a job."""
    previous = getattr(_local, "token", None)
    _local.token = token
    try:
        yield
    finally:
        _local.token = previous


def current() -> CancelToken | None:
    """The token bound to this thread (None outside a compute job)."""
    return getattr(_local, "token", None)


def checkpoint() -> None:
    """Raise Cancelled if the job running on this thread has been abandoned."""
    token: CancelToken | None = getattr(_local, "token", None)
    if token is not None and token.cancelled:
        raise Cancelled(token.reason)
