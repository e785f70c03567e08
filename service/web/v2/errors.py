"""The Open Inference Protocol's errors: its exceptions, and its error form {"error": "..."}."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

from service.web.problems import ServiceError


class ProtocolError(ServiceError):
    """A request that does not follow the protocol (400)."""

    status, slug, title = 400, "bad-request", "Bad request"


class UnknownModel(ServiceError):
    status, slug, title = 404, "unknown-model", "Unknown model"


class ModelNotReady(ServiceError):
    # The health API's "false" is a 4xx status; the body says why.
    status, slug, title = 400, "not-ready", "Not ready"


def error_response(status: int, message: str, headers: Mapping[str, str]) -> Response:
    """The protocol's error answer: {"error": message}, with the status the service chose
    (except 422, which the protocol calls 400) and its headers (Retry-After, ...).

    The app's exception handlers answer this way on /v2 paths (service.web.problems.ErrorForms),
    so every error of the service (routing's 404 and 405, the body limit's 413, the scheduler's
    503, validation, a bug's 500) takes the protocol's form there.
    """
    return Response(
        orjson.dumps({"error": message}),
        status_code=400 if status == 422 else status,
        headers=dict(headers),
        media_type="application/json",
    )
