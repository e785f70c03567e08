"""POST /v1/attention: scaled dot-product attention on tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import compare_view, wire
from service.api import attention
from service.jobs import run_attention
from service.problems import PROBLEM_RESPONSES
from service.schemas import AttentionRequest, AttentionResponse, request_body
from service.state import AppState, app_state

router = APIRouter(tags=["attention"])


@router.post(
    "/v1/attention",
    response_model=AttentionResponse,
    responses=PROBLEM_RESPONSES,
    openapi_extra=request_body(AttentionRequest),
    summary="Scaled dot-product attention",
)
async def post_attention(request: Request) -> Response:
    """softmax(scale * q k^T + masks) v with every option of the native library.

    Tensors are nested lists, {dtype, shape, data} or {dtype, shape, b64}; results come back
    in q's encoding unless `encoding` says otherwise.
    """
    state = app_state(request)
    state.core.raise_if_full("attention")
    body = await request.body()
    return await state.core.run("attention", _job, state, body, receive=request.receive)


def _job(state: AppState, body: bytes) -> Response:
    data = wire.parse_json(body, wire.tensor_fields(AttentionRequest))
    req = wire.validate(AttentionRequest, data, state.settings.max_elements)
    job = run_attention(
        state,
        req.q,
        req.k,
        req.v,
        req,
        req.heatmap,
        return_weights=req.return_weights,
        stats=req.stats,
        top_k=req.top_k,
        compute=attention,
    )
    result, maps = job.result, job.maps
    enc = req.encoding or "list"
    content: dict = {"output": wire.encode(result.output, enc)}
    if req.return_weights:
        content["weights"] = wire.encode(result.weights, enc)
        content["lse"] = wire.encode(result.lse, enc)
    if result.comparison is not None:
        content["comparison"] = compare_view.to_json(result.comparison, enc)
    if maps is not None:
        content["stats"] = {
            "entropy": wire.encode(maps.entropy, enc),
            "top_k": {
                "indices": wire.encode(maps.top_k_indices, enc),
                "weights": wire.encode(maps.top_k_weights, enc),
            },
            "column_sums": wire.encode(maps.column_sums, enc),
        }
    content["heatmaps"] = job.heatmaps
    content["meta"] = {
        "shape": list(result.output.shape),
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": result.method,
    }
    return wire.json_response(content)
