"""The Open Inference Protocol (KServe v2 / Triton) front: health, metadata and inference.

Routes stay thin: the protocol is in service.inference_protocol, the models in
service.inference_models; computations run on the compute core shared with /v1.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import inference_protocol as protocol
from service import wire
from service.inference_models import VERSION, Model, get_model
from service.state import AppState, app_state

router = APIRouter(tags=["open inference protocol (v2)"])
# The health probes stay open when the rest of the API needs a key (see service.security).
health_router = APIRouter(tags=["open inference protocol (v2)"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": desc, "model": protocol.ErrorResponse}
    for status, desc in {
        400: "Bad request (the message names the input or parameter).",
        404: "Unknown model or version.",
        413: "Body or tensor larger than a configured limit (the limit is named).",
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
            "application/json": {"schema": protocol.inline_schema(protocol.InferenceRequest)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _not_ready(state: AppState) -> str | None:
    """Why the service cannot infer (as /readyz judges), or None when it can."""
    try:
        from service import _native

        _native.version()
    except Exception as exc:  # an ImportError or a broken build: not ready, never a 500
        return f"the native module is not usable: {exc}"
    if not state.store.writable():
        return f"the heatmap store {state.store.directory} is not writable"
    return None


@router.get("/v2", response_model=protocol.ServerMetadata, summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    """Name, version and the protocol extensions supported."""
    return wire.json_response(
        {
            "name": request.app.title,
            "version": request.app.version,
            "extensions": list(protocol.EXTENSIONS),
        }
    )


# response_class=Response: these answer an empty body, so the schema documents no content.
@health_router.get(
    "/v2/health/live", summary="Server live", status_code=200, response_class=Response
)
async def server_live() -> Response:
    """200 while the process answers (empty body, as the protocol asks)."""
    return Response(status_code=200)


@health_router.get(
    "/v2/health/ready", summary="Server ready", responses=_ERRORS, response_class=Response
)
def server_ready(request: Request) -> Response:
    """200 when every model can infer; 400 with the reason otherwise."""
    reason = _not_ready(app_state(request))
    if reason:
        raise protocol.ModelNotReady(reason)
    return Response(status_code=200)


@router.get(
    "/v2/models/{model_name}",
    response_model=protocol.ModelMetadata,
    responses=_ERRORS,
    summary="Model metadata",
)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}",
    response_model=protocol.ModelMetadata,
    responses=_ERRORS,
    summary="Model metadata (one version)",
)
async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
    """Inputs and outputs with name, datatype and shape (-1: variable)."""
    return wire.json_response(get_model(model_name, model_version).metadata())


@router.get(
    "/v2/models/{model_name}/ready",
    responses=_ERRORS,
    summary="Model ready",
    response_class=Response,
)
@router.get(
    "/v2/models/{model_name}/versions/{model_version}/ready",
    responses=_ERRORS,
    response_class=Response,
    summary="Model ready (one version)",
)
def model_ready(request: Request, model_name: str, model_version: str | None = None) -> Response:
    """200 when the model can infer; 404 for an unknown model."""
    get_model(model_name, model_version)
    return server_ready(request)


@router.post(
    "/v2/models/{model_name}/infer",
    response_model=protocol.InferenceResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
    summary="Inference",
)
@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    response_model=protocol.InferenceResponse,
    responses=_ERRORS,
    openapi_extra=_INFER_BODY,
    summary="Inference (one version)",
)
async def infer(request: Request, model_name: str, model_version: str | None = None) -> Response:
    """JSON tensors, or binary ones (Inference-Header-Content-Length); parameters are options.

    Outputs come back as JSON `data`, or as raw bytes after the JSON header when requested with
    `binary_data` (per output) or `binary_data_output` (every output).
    """
    model = get_model(model_name, model_version)
    state = app_state(request)
    job = f"v2-{model.name}"
    state.core.raise_if_full(job)
    body = await request.body()
    return await state.core.run(
        job, _job, state, model, body, request.headers, receive=request.receive
    )


def _job(state: AppState, model: Model, body: bytes, headers: Any) -> Response:
    header, binary = protocol.split_body(
        body,
        headers.get(protocol.HEADER_LENGTH),
        headers.get("content-encoding"),
        state.settings.max_body_bytes,
    )
    req = protocol.parse_request(header)
    tensors = protocol.decode_inputs(req.inputs, binary, model.inputs, state.settings.max_elements)
    selection = protocol.select_outputs(req, model.outputs)
    outputs, parameters = model.infer(
        state, tensors, protocol.model_parameters(req.parameters), selection.names
    )
    return protocol.infer_response(
        model_name=model.name,
        model_version=VERSION,
        request_id=req.id,
        outputs=outputs.items(),
        selection=selection,
        parameters=parameters,
        accept_encoding=headers.get("accept-encoding"),
    )
