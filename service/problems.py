"""RFC 9457 problem details: every error the service answers is application/problem+json."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service.errors import InputError, LimitError
from service.tensors import LIMIT_ERROR_TYPE, TensorError, TensorLimitError

PROBLEM_MEDIA_TYPE = "application/problem+json"
_TYPE_PREFIX = "urn:attention-service:problem:"

log = logging.getLogger("service")


class ErrorItem(BaseModel):
    """One invalid input: where it is and what is wrong."""

    loc: list[str | int] = Field(description="Path to the field, e.g. ['window', 'left'].")
    msg: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "type": _TYPE_PREFIX + "invalid-input",
                    "title": "Invalid input",
                    "status": 422,
                    "detail": "q: shape (4, 8) and k: shape (4, 16) differ in the head dim",
                    "instance": "/v1/attention",
                    "errors": [{"loc": ["q"], "msg": "head dim differs from k (8 vs 16)"}],
                }
            ]
        }
    )

    type: str = Field(description="A URI naming the kind of problem ('about:blank' = plain HTTP).")
    title: str
    status: int
    detail: str
    instance: str | None = Field(None, description="The request path.")
    errors: list[ErrorItem] | None = Field(None, description="Each invalid field (422 and 413).")


class ServiceError(Exception):
    """An error the service raises on purpose; it knows its status and problem type."""

    status: int = 500
    slug: str = "internal"
    title: str = "Internal error"

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


class MalformedBody(ServiceError):
    status, slug, title = 400, "malformed-body", "Malformed request body"


class BodyTooLarge(ServiceError):
    status, slug, title = 413, "body-too-large", "Request body too large"


class BodyTimeout(ServiceError):
    status, slug, title = 408, "body-timeout", "Request body too slow"


class Overloaded(ServiceError):
    status, slug, title = 503, "overloaded", "Service overloaded"


class NotReady(ServiceError):
    status, slug, title = 503, "not-ready", "Service not ready"


class ComputeTimeout(ServiceError):
    status, slug, title = 504, "timeout", "Computation timed out"


class ClientClosed(ServiceError):
    # nginx's 499: nobody reads this answer, but the access log and the metrics do.
    status, slug, title = 499, "client-closed", "Client closed the request"


class Unauthorized(ServiceError):
    status, slug, title = 401, "unauthorized", "Unauthorized"


class RateLimited(ServiceError):
    status, slug, title = 429, "rate-limited", "Too many requests"


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
        body["errors"] = errors
    try:
        content = orjson.dumps(body)
    except TypeError:  # text orjson refuses (a lone surrogate from the input): escape it
        content = json.dumps(body, ensure_ascii=True, default=str).encode()
    return Response(content, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


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


def validation_items(exc: ValidationError | RequestValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as [{"loc", "msg"}], one per field (union alternatives merged)."""
    merged: dict[tuple[str | int, ...], list[str]] = {}
    for e in exc.errors():
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


def _validation_problem(
    request: Request, exc: ValidationError | RequestValidationError
) -> Response:
    items = validation_items(exc)
    # A tensor over the element limit is a size problem (413), not a malformed value.
    if any(e.get("type") == LIMIT_ERROR_TYPE for e in exc.errors()):
        status, slug, title = 413, "limit-exceeded", "Input too large"
    else:
        status, slug, title = 422, "invalid-input", "Invalid input"
    return problem_response(
        status, _summary(items), title=title, slug=slug, errors=items, instance=request.url.path
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error, expected or not, to a problem+json answer."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no resource at {request.url.path}"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            detail = f"{request.method} is not allowed on {request.url.path}"
        return problem_response(
            exc.status_code,
            detail,
            headers=dict(exc.headers or {}),
            instance=request.url.path,
        )

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError) -> Response:
        return _validation_problem(request, exc)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError) -> Response:
        return _validation_problem(request, exc)

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: InputError) -> Response:
        limit = isinstance(exc, LimitError)
        return problem_response(
            413 if limit else 422,
            f"{_loc_str(list(exc.loc))}: {exc.msg}",
            title="Input too large" if limit else "Invalid input",
            slug="limit-exceeded" if limit else "invalid-input",
            errors=[{"loc": list(exc.loc), "msg": exc.msg}],
            instance=request.url.path,
        )

    @app.exception_handler(TensorError)
    async def _tensor(request: Request, exc: TensorError) -> Response:
        # Normally wrapped into InputError with a field name; this is the fallback.
        limit = isinstance(exc, TensorLimitError)
        return problem_response(
            413 if limit else 422,
            str(exc),
            title="Input too large" if limit else "Invalid input",
            slug="limit-exceeded" if limit else "invalid-input",
            instance=request.url.path,
        )

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> Response:
        return problem_response(
            exc.status,
            exc.detail,
            title=exc.title,
            slug=exc.slug,
            errors=exc.errors,
            headers=exc.headers,
            instance=request.url.path,
        )

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left while sending its body: nobody reads this, but it is no server error.
        return problem_response(
            ClientClosed.status,
            "the client closed the connection before sending the whole body",
            title=ClientClosed.title,
            slug=ClientClosed.slug,
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        # A bug, never an input problem; logged with its traceback, answered as a problem.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            500,
            "an unexpected error occurred; it has been logged",
            title="Internal error",
            slug="internal",
            instance=request.url.path,
        )


# OpenAPI description of the error answers, shared by every route.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": desc,
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    for status, desc in {
        400: "Malformed JSON body.",
        408: "The request body did not arrive in time (ATTN_BODY_TIMEOUT_S).",
        413: "Body or tensor larger than a configured limit (the limit is named).",
        422: "Invalid input; `errors` names each field.",
        503: "Overloaded (with Retry-After); retry later.",
        504: "The computation took longer than ATTN_REQUEST_TIMEOUT_S.",
    }.items()
}
