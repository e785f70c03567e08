"""One call into the extension: cancellable, its ValueErrors turned into InputErrors, timed."""

from __future__ import annotations

import time
from typing import Any

from service import _native
from service.core.cancel import Cancelled, checkpoint, current
from service.core.errors import InputError


def call_native(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run a native kernel; its ValueErrors become InputErrors. Returns (result, elapsed ms)."""
    checkpoint()  # an abandoned HTTP job stops here instead of starting the kernel
    token = current()
    if token is not None:  # and a running kernel stops once the token is cancelled
        kwargs["cancel"] = token.flag
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except _native.Cancelled:
        raise Cancelled(token.reason if token is not None else "cancelled") from None
    except ValueError as exc:
        head, sep, rest = str(exc).partition(": ")
        loc = head if sep and head.isidentifier() else "input"
        raise InputError(loc, rest if loc == head else str(exc)) from None
    return result, (time.perf_counter() - start) * 1e3
