"""POST /v1/multihead: torch.nn.MultiheadAttention semantics, grouped-query heads included."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import wire
from service.api import multihead_attention
from service.jobs import run_multihead
from service.problems import PROBLEM_RESPONSES
from service.schemas import MultiheadRequest, MultiheadResponse, request_body
from service.state import AppState, app_state

router = APIRouter(tags=["attention"])


@router.post(
    "/v1/multihead",
    response_model=MultiheadResponse,
    responses=PROBLEM_RESPONSES,
    openapi_extra=request_body(MultiheadRequest),
    summary="Multi-head attention",
)
async def post_multihead(request: Request) -> Response:
    """Projections, attention per head and the output projection, as in torch.

    Without `weights`, Xavier-uniform projections are drawn from `seed` (reproducible).
    """
    state = app_state(request)
    state.core.raise_if_full("multihead")
    body = await request.body()
    return await state.core.run("multihead", _job, state, body, receive=request.receive)


def _job(state: AppState, body: bytes) -> Response:
    req = wire.validate(MultiheadRequest, wire.parse_json(body), state.settings.max_elements)
    job = run_multihead(
        state,
        req.query,
        req.key,
        req.value,
        req,
        req.heatmap,
        need_weights=req.need_weights,
        compute=multihead_attention,
    )
    result, weights = job.result, job.weights
    enc = req.encoding or "list"
    content: dict = {"output": wire.encode(result.output, enc)}
    if req.need_weights:
        content["weights"] = wire.encode(weights, enc)
        content["lse"] = wire.encode(result.lse, enc)
    content["heatmaps"] = job.heatmaps
    content["meta"] = {
        "shape": list(result.output.shape),
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": "exact",
        "param_count": result.param_count,
    }
    return wire.json_response(content)
