"""The Open Inference Protocol (KServe v2 / Triton) routes: health, metadata and inference.

Routes stay thin: the wire format is in codec.py (requests) and response.py, the documents in
datamodels.py, the models in models.py; computations run on the scheduler shared with /v1.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import Headers
from starlette.responses import Response

from service.web import sessions, wire
from service.web.deps import AppState, StateDep
from service.web.health import not_ready
from service.web.v2 import codec, response
from service.web.v2.datamodels import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ServerMetadata,
    inline_schema,
)
from service.web.v2.errors import ModelNotReady
from service.web.v2.models import VERSION, Model, get_model

PREFIX = "/v2"
_TAGS: list[str | Enum] = ["open inference protocol (v2)"]

router = APIRouter(prefix=PREFIX, tags=_TAGS)
# The health probes stay open when the rest of the API needs a key (see service.web.security).
health_router = APIRouter(prefix=PREFIX, tags=_TAGS)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": desc, "model": ErrorResponse}
    for status, desc in {
        400: "Bad request (the message names the input or parameter).",
        404: "Unknown model or version, or an unknown or expired sequence_id.",
        409: "A sequence's request raced another one of the same sequence; it was not applied.",
        413: "Body or tensor larger than a configured limit (the limit is named).",
        415: "The body is neither JSON nor application/octet-stream (binary tensor data).",
        503: "Overloaded (with Retry-After); retry later.",
    }.items()
}

_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON; with the binary tensor data extension, the JSON header (its "
        "length in the Inference-Header-Content-Length header) followed by the inputs' "
        "little-endian bytes, in input order.",
        "content": {
            "application/json": {"schema": inline_schema(InferenceRequest)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    """Name, version and the protocol extensions supported."""
    return wire.json_response(
        {
            "name": request.app.title,
            "version": request.app.version,
            "extensions": list(codec.EXTENSIONS),
        }
    )


# response_class=Response: these answer an empty body, so the schema documents no content.
@health_router.get("/health/live", summary="Server live", status_code=200, response_class=Response)
async def server_live() -> Response:
    """200 while the process answers (empty body, as the protocol asks)."""
    return Response(status_code=200)


@health_router.get(
    "/health/ready", summary="Server ready", responses=_ERRORS, response_class=Response
)
def server_ready(state: StateDep) -> Response:
    """200 when every model can infer; 400 with the reason otherwise."""
    reason = not_ready(state)
    if reason:
        raise ModelNotReady(reason)
    return Response(status_code=200)


@router.get(
    "/models/{model_name}",
    response_model=ModelMetadata,
    responses=_ERRORS,
    summary="Model metadata",
)
@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadata,
    responses=_ERRORS,
    summary="Model metadata (one version)",
)
async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
    """Inputs and outputs with name, datatype and shape (-1: variable)."""
    return wire.json_response(get_model(model_name, model_version).metadata())


@router.get(
    "/models/{model_name}/ready",
    responses=_ERRORS,
    summary="Model ready",
    response_class=Response,
)
@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    responses=_ERRORS,
    response_class=Response,
    summary="Model ready (one version)",
)
def model_ready(state: StateDep, model_name: str, model_version: str | None = None) -> Response:
    """200 when the model can infer; 404 for an unknown model."""
    get_model(model_name, model_version)
    return server_ready(state)


@router.post(
    "/models/{model_name}/infer",
    response_model=InferenceResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
    summary="Inference",
)
@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    response_model=InferenceResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
    summary="Inference (one version)",
)
async def infer(
    request: Request, state: StateDep, model_name: str, model_version: str | None = None
) -> Response:
    """JSON tensors, or binary ones (Inference-Header-Content-Length); parameters are options.

    Outputs come back as JSON `data`, or as raw bytes after the JSON header when requested with
    `binary_data` (per output) or `binary_data_output` (every output). Model `attention` keeps
    sequences (sequence_id, sequence_start, sequence_end): the memory_* parameters of the
    starting request open a recurrent memory that each request of the sequence appends to.
    """
    model = get_model(model_name, model_version)
    codec.check_content_type(request.headers)
    job = f"v2-{model.name}"
    return await state.scheduler.run_request(job, request, _job, state, model, request.headers)


def _job(state: AppState, model: Model, headers: Headers, body: bytes) -> Response:
    header, binary = codec.split_body(
        body,
        headers.get(codec.HEADER_LENGTH),
        headers.get("content-encoding"),
        state.settings.max_body_bytes,
    )
    req = codec.parse_request(header)
    sequence = codec.sequence_of(req.parameters)
    tensors = codec.decode_inputs(req.inputs, binary, model.inputs, state.settings.max_elements)
    selection = response.select_outputs(req, model.outputs)
    owner = sessions.owner_of(state, headers.get("authorization"))
    outputs, parameters = model.infer(
        state,
        tensors,
        codec.model_parameters(req.parameters),
        selection.names,
        sequence,
        owner,
    )
    return response.infer_response(
        model_name=model.name,
        model_version=VERSION,
        request_id=req.id,
        outputs=outputs.items(),
        selection=selection,
        parameters=parameters,
        accept_encoding=headers.get("accept-encoding"),
    )
