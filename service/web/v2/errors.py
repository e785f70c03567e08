"""The Open Inference Protocol's errors: its exceptions, and its error form {"error": "..."}."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.responses import Response

from service.web.problems import ServiceError


class ProtocolError(ServiceError, status=400, slug="bad-request", title="Bad request"):
    """A request that does not follow the protocol (400)."""


class UnknownModel(ServiceError, status=404, slug="unknown-model", title="Unknown model"):
    """No model (or no version of it) by that name (404)."""


class ModelNotReady(ServiceError, status=400, slug="not-ready", title="Not ready"):
    """A model cannot infer now: the health API's "false" is a 4xx status; the body says why."""


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
