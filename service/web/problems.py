"""Errors as answers: RFC 9457 application/problem+json, or a front's own form on its paths.

Every error the service answers is produced here, by the app's exception handlers (and by the
body-limit middleware, which answers before a route runs). A protocol front with an error form
of its own registers it for its path prefix (ErrorForms.add): /v2 answers {"error": ...}.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.core.cancel import Cancelled
from service.core.errors import InputError, LimitError
from service.core.tensor_codec import TensorError, TensorLimitError
from service.core.tensor_field import LIMIT_ERROR_TYPE
from service.web.docs import example_config

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:attention-service:problem:"
# An answer lists at most this many errors, plus a count of the rest: garbage in a request must
# not make its answer grow.
MAX_ERRORS = 20

log = logging.getLogger("service")


class ErrorItem(BaseModel):
    """One invalid input: where it is and what is wrong."""

    loc: list[str | int] = Field(description="Path to the field, e.g. ['window', 'left'].")
    msg: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    model_config = example_config(
        {
            "type": _TYPE_PREFIX + "invalid-input",
            "title": "Invalid input",
            "status": 422,
            "detail": "q: shape (4, 8) and k: shape (4, 16) differ in the head dim",
            "instance": "/v1/attention",
            "errors": [{"loc": ["q"], "msg": "head dim differs from k (8 vs 16)"}],
        },
    )

    type: str = Field(description="A URI naming the kind of problem ('about:blank' = plain HTTP).")
    title: str
    status: int
    detail: str
    instance: str | None = Field(None, description="The request path.")
    errors: list[ErrorItem] | None = Field(
        None, description=f"Each invalid field (422 and 413): the first {MAX_ERRORS}."
    )
    more_errors: int | None = Field(
        None, description=f"How many errors there are beyond the first {MAX_ERRORS} listed."
    )


class ServiceError(Exception):
    """An error the service raises on purpose; it knows its status and problem type, which a
    subclass declares: `class Gone(ServiceError, status=410, slug="gone", title="Gone")`."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init_subclass__(cls, *, status: int, slug: str, title: str) -> None:
        super().__init_subclass__()
        cls.status, cls.slug, cls.title = status, slug, title

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        self.errors = errors


class MalformedBody(
    ServiceError, status=400, slug="malformed-body", title="Malformed request body"
):
    """The body is not JSON, or not the JSON object a route reads."""


class UnsupportedMediaType(
    ServiceError, status=415, slug="unsupported-media-type", title="Unsupported media type"
):
    """The body's Content-Type is not one the route reads (JSON routes read JSON only)."""


class BodyTooLarge(ServiceError, status=413, slug="body-too-large", title="Request body too large"):
    """The body is over ATTN_MAX_BODY_BYTES: declared, streamed, or once decompressed."""


class BodyTimeout(ServiceError, status=408, slug="body-timeout", title="Request body too slow"):
    """The body did not arrive within ATTN_BODY_TIMEOUT_S of the request's start."""


class Overloaded(ServiceError, status=503, slug="overloaded", title="Service overloaded"):
    """The scheduler's workers and queue are full; Retry-After says when to retry."""


class NotReady(ServiceError, status=503, slug="not-ready", title="Service not ready"):
    """The extension is unusable or the heatmap store is not writable (/readyz)."""


class StoreUnavailable(
    ServiceError, status=503, slug="store-unavailable", title="State store unavailable"
):
    """The shared state store (Redis) cannot be reached: a request that reads or writes state
    (a stored heatmap, a session) is answered 503 with Retry-After, never 404, since what it
    asks for may well exist."""


class ComputeTimeout(ServiceError, status=504, slug="timeout", title="Computation timed out"):
    """The job spent longer than ATTN_REQUEST_TIMEOUT_S in the scheduler."""


class ClientClosed(
    ServiceError, status=499, slug="client-closed", title="Client closed the request"
):
    """The client left before the answer (nginx's 499): nobody reads this answer, but the
    access log and the metrics do."""


class OutOfMemory(ServiceError, status=503, slug="out-of-memory", title="Out of memory"):
    """The machine ran short of memory for a computation within the limits."""


class InternalError(ServiceError, status=500, slug="internal", title="Internal error"):
    """A bug: never an input problem."""


class Unauthorized(ServiceError, status=401, slug="unauthorized", title="Unauthorized"):
    """No API key, or not one of ATTN_API_KEYS."""


class RateLimited(ServiceError, status=429, slug="rate-limited", title="Too many requests"):
    """The caller is over ATTN_RATE_LIMIT; Retry-After says when to retry."""


class ModelNotAvailable(
    ServiceError, status=404, slug="model-not-installed", title="Model not installed"
):
    """A real model whose package is not installed here: 404, as a model server answers for a
    model it does not have; the detail says how to install it."""


class ModelRefused(ServiceError, status=503, slug="model-refused", title="Model refused"):
    """A real model whose files failed their checks (hash, shapes): never run."""


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    slug: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    instance: str | None = None,
) -> Response:
    """A problem+json response; without a slug the type is about:blank (plain HTTP status)."""
    body: dict[str, Any] = {
        "type": _TYPE_PREFIX + slug if slug else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if errors is not None:
        body["errors"] = errors[:MAX_ERRORS]
        if len(errors) > MAX_ERRORS:
            body["more_errors"] = len(errors) - MAX_ERRORS
    try:
        content = orjson.dumps(body)
    except TypeError:  # text orjson refuses (a lone surrogate from the input): escape it
        content = json.dumps(body, ensure_ascii=True, default=str).encode()
    return Response(content, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


# A front's error form: (status, detail, headers) -> the answer.
ErrorForm = Callable[[int, str, Mapping[str, str]], Response]


class ErrorForms:
    """Which form an error takes, by path: a front's own form under its prefix, else a problem."""

    def __init__(self) -> None:
        self._forms: list[tuple[str, ErrorForm]] = []

    def add(self, prefix: str, form: ErrorForm) -> None:
        """Errors on `prefix` and the paths below it are answered by `form`."""
        self._forms.append((prefix, form))

    def answer(self, path: str, status: int, detail: str, **problem: Any) -> Response:
        """The error's answer on `path`; `problem`: problem_response's title, slug, errors and
        headers (a front's own form keeps only the headers)."""
        for prefix, form in self._forms:
            if path == prefix or path.startswith(prefix + "/"):
                return form(status, detail, problem.get("headers") or {})
        return problem_response(status, detail, instance=path, **problem)


def _clean_msg(msg: str) -> str:
    # pydantic prefixes messages of ValueErrors raised in validators; the field says enough.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _loc_str(loc: list[str | int]) -> str:
    return ".".join(map(str, loc)) or "body"


# pydantic names the union member that failed inside a loc ("bool", "literal['all','mean']",
# "list[int]"); such parts are dropped so that a loc names fields only.
_TYPE_TAGS = frozenset({"bool", "int", "float", "str", "none", "dict", "list"})


def _is_tag(part: str | int) -> bool:
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def _errors(exc: ValidationError | RequestValidationError) -> Sequence[Any]:
    """The errors without their inputs (which may be large) and urls: only loc, msg and type
    are used."""
    if isinstance(exc, ValidationError):
        return exc.errors(include_url=False, include_input=False, include_context=False)
    return exc.errors()


def validation_items(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as [{"loc", "msg"}], one per field (union alternatives merged)."""
    merged: dict[tuple[str | int, ...], list[str]] = {}
    for e in _errors(exc):
        loc = tuple(p for p in e["loc"] if not _is_tag(p))
        msgs = merged.setdefault(loc, [])
        msg = _clean_msg(str(e["msg"]))
        if msg not in msgs:
            msgs.append(msg)
    return [{"loc": list(loc), "msg": " or ".join(msgs)} for loc, msgs in merged.items()]


def _summary(items: list[dict[str, Any]]) -> str:
    parts = [f"{_loc_str(i['loc'])}: {i['msg']}" for i in items[:3]]
    if len(items) > 3:
        parts.append(f"and {len(items) - 3} more")
    return "; ".join(parts)


def _limit_or_invalid(limit: bool) -> dict[str, Any]:
    """Status, title and type of an input problem: too large (413) or invalid (422)."""
    if limit:
        return {"status": 413, "title": "Input too large", "slug": "limit-exceeded"}
    return {"status": 422, "title": "Invalid input", "slug": "invalid-input"}


# The one mapping from what can go wrong to an answer. Each entry: an exception type (matched
# by its class hierarchy, the most specific entry winning) and the answer's fields (status,
# detail, and title, slug, errors, headers when the problem form has them). Every front answers
# through it: /v1 as problem+json, /v2 in its own form (ErrorForms), so an exception the core
# can raise is answered the same way on both.
Describe = Callable[[Request, Any], dict[str, Any]]


def _http(request: Request, exc: StarletteHTTPException) -> dict[str, Any]:
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no resource at {request.url.path}"
    elif exc.status_code == 405 and detail == "Method Not Allowed":
        detail = f"{request.method} is not allowed on {request.url.path}"
    return {"status": exc.status_code, "detail": detail, "headers": dict(exc.headers or {})}


def _validation(request: Request, exc: ValidationError | RequestValidationError) -> dict[str, Any]:
    items = validation_items(exc)
    # A tensor over the element limit is a size problem (413), not a malformed value.
    limit = any(e.get("type") == LIMIT_ERROR_TYPE for e in _errors(exc))
    return {"detail": _summary(items), "errors": items, **_limit_or_invalid(limit)}


def _input(request: Request, exc: InputError) -> dict[str, Any]:
    return {
        "detail": f"{_loc_str(list(exc.loc))}: {exc.msg}",
        "errors": [{"loc": list(exc.loc), "msg": exc.msg}],
        **_limit_or_invalid(isinstance(exc, LimitError)),
    }


def _tensor(request: Request, exc: TensorError) -> dict[str, Any]:
    # Normally wrapped into InputError with a field name; this is the fallback.
    return {"detail": str(exc), **_limit_or_invalid(isinstance(exc, TensorLimitError))}


def _service(request: Request, exc: ServiceError) -> dict[str, Any]:
    return {
        "status": exc.status,
        "detail": exc.detail,
        "title": exc.title,
        "slug": exc.slug,
        "errors": exc.errors,
        "headers": exc.headers,
    }


def _as(error: type[ServiceError], detail: str) -> dict[str, Any]:
    return {"status": error.status, "detail": detail, "title": error.title, "slug": error.slug}


def _gone(request: Request, exc: ClientDisconnect) -> dict[str, Any]:
    # The client left while sending its body: nobody reads this, but it is no server error.
    return _as(ClientClosed, "the client closed the connection before sending the whole body")


def _cancelled(request: Request, exc: Cancelled) -> dict[str, Any]:
    # A job stopped at a checkpoint after the scheduler gave up on it; the scheduler has
    # answered already, so this only shows if a job's own caller sees the exception.
    if str(exc) == "disconnect":
        return _as(ClientClosed, "the client closed the connection before the answer was ready")
    return _as(ComputeTimeout, "the computation was stopped (ATTN_REQUEST_TIMEOUT_S)")


def _memory(request: Request, exc: MemoryError) -> dict[str, Any]:
    # The limits are checked before work starts, so this is the machine running short of
    # memory (other work at the same time): a retry may succeed.
    return {
        **_as(OutOfMemory, "the computation ran out of memory; retry later or ask for less"),
        "headers": {"Retry-After": "1"},
    }


def _unexpected(request: Request, exc: Exception) -> dict[str, Any]:
    # A bug, never an input problem; logged with its traceback, answered as a problem.
    # (Starlette's ServerErrorMiddleware sends this answer, then re-raises for the server.)
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _as(InternalError, "an unexpected error occurred; it has been logged")


ERROR_MAPPING: dict[type[Exception], Describe] = {
    StarletteHTTPException: _http,
    RequestValidationError: _validation,
    ValidationError: _validation,
    InputError: _input,  # LimitError included (413)
    TensorError: _tensor,  # TensorLimitError included (413)
    ServiceError: _service,  # the web layer's own errors, each with its status
    ClientDisconnect: _gone,
    Cancelled: _cancelled,
    MemoryError: _memory,
    Exception: _unexpected,
}


def install_problem_handlers(app: FastAPI, forms: ErrorForms) -> None:
    """Route every error, expected or not, to an answer in the form its path takes."""
    for exc_type, describe in ERROR_MAPPING.items():

        async def handler(request: Request, exc: Any, describe: Describe = describe) -> Response:
            return forms.answer(request.url.path, **describe(request, exc))

        app.add_exception_handler(exc_type, handler)


# OpenAPI description of the error answers, shared by every route.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": desc,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for status, desc in {
        400: "Malformed JSON body.",
        408: "The request body did not arrive in time (ATTN_BODY_TIMEOUT_S).",
        415: "The body is not JSON (Content-Type application/json or +json, UTF-8).",
        413: "Body or tensor larger than a configured limit (the limit is named).",
        422: "Invalid input; `errors` names each field.",
        503: "Overloaded, or the state store (Redis) unreachable; retry after Retry-After.",
        504: "The computation took longer than ATTN_REQUEST_TIMEOUT_S.",
    }.items()
}
