"""What a /v1 route that reads a JSON body declares, in one call.

The routes parse their bodies themselves (orjson + numpy), so FastAPI cannot see the request
model: it is documented by reference (docs.request_body), beside the response model and the
problem responses (RFC 9457) that every such route can answer.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from service.web.docs import request_body
from service.web.problems import PROBLEM_RESPONSES

Responses = dict[int | str, dict[str, Any]]


def json_io(
    body: type[BaseModel] | tuple[type[BaseModel], ...],
    response: Any,
    responses: Responses = PROBLEM_RESPONSES,
) -> dict[str, Any]:
    """Keyword arguments of `router.post(...)`: the body (one model, or alternatives), the
    response model and the documented error responses."""
    bodies = body if isinstance(body, tuple) else (body,)
    return {
        "response_model": response,
        "responses": responses,
        "openapi_extra": request_body(*bodies),
    }
