"""POST /v1/multihead: torch.nn.MultiheadAttention semantics, grouped-query heads included."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.core.multihead import multihead_attention
from service.web import wire
from service.web.deps import AppState, StateDep
from service.web.jobs import run_multihead
from service.web.v1.routing import json_io
from service.web.v1.schemas import MultiheadRequest, MultiheadResponse

router = APIRouter(prefix="/v1", tags=["attention"])


@router.post(
    "/multihead", summary="Multi-head attention", **json_io(MultiheadRequest, MultiheadResponse)
)
async def post_multihead(request: Request, state: StateDep) -> Response:
    """Projections, attention per head and the output projection, as in torch.

    Without `weights`, Xavier-uniform projections are drawn from `seed` (reproducible).
    """
    wire.require_json(request.headers)
    return await state.scheduler.run_request("multihead", request, _job, state)


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
    result = job.result
    enc = req.encoding or "list"
    content: dict = {"output": wire.encode(result.output, enc)}
    if req.need_weights or req.weights_rows is not None:
        content["weights"] = wire.encode(job.weights, enc)
        content["lse"] = wire.encode(result.lse, enc)
    content["heatmaps"] = job.heatmaps
    content["meta"] = wire.meta(result, "exact", param_count=result.param_count)
    return wire.json_response(content)
