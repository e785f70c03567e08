"""POST /v1/attention: scaled dot-product attention on tensors."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from service.core.attention import attention
from service.core.tensor_codec import Encoding
from service.web import wire
from service.web.deps import AppState, StateDep
from service.web.jobs import fits_inline, run_attention
from service.web.scheduler import Deferred
from service.web.v1.routing import json_io
from service.web.v1.schemas import AttentionRequest, AttentionResponse

router = APIRouter(prefix="/v1", tags=["attention"])

# Fields of a comparison that are arrays (the rest are numbers and strings).
_COMPARISON_ARRAYS = ("rel_error_per_head", "implied_map", "exact_map")


@router.post(
    "/attention",
    summary="Scaled dot-product attention",
    **json_io(AttentionRequest, AttentionResponse),
)
async def post_attention(request: Request, state: StateDep) -> Response:
    """softmax(scale * q k^T + masks) v with every option of the native library.

    Tensors are nested lists, {dtype, shape, data} or {dtype, shape, b64}; results come back
    in q's encoding unless `encoding` says otherwise.
    """
    wire.require_json(request.headers)
    return await state.scheduler.run_request("attention", request, _job, state, inline=True)


def _comparison(comparison: dict[str, Any], encoding: Encoding) -> dict[str, Any]:
    """The comparison for a response body; arrays in the response's encoding."""
    return {
        key: wire.encode(np.asarray(val), encoding)
        if key in _COMPARISON_ARRAYS and val is not None
        else val
        for key, val in comparison.items()
    }


def _job(state: AppState, body: bytes) -> Response | Deferred:
    """Parses the request; answers a small one at once, else defers the computation (the
    scheduler may run this on the event loop, see Scheduler.run_request)."""
    data = wire.parse_json(body, wire.tensor_fields(AttentionRequest))
    req = wire.validate(AttentionRequest, data, state.settings.max_elements)
    if fits_inline(req.q, req.k, req.v, req, heatmap=req.heatmap, stats=req.stats):
        return _answer(state, req)
    return Deferred(partial(_answer, state, req))


def _answer(state: AppState, req: AttentionRequest) -> Response:
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
        chunks=req.chunks,
    )
    result, maps = job.result, job.maps
    enc = req.encoding or "list"
    content: dict = {"output": wire.encode(result.output, enc)}
    if req.return_weights or req.weights_rows is not None:
        content["weights"] = wire.encode(result.weights, enc)
        content["lse"] = wire.encode(result.lse, enc)
        if result.slot_weights is not None:
            content["slot_weights"] = wire.encode(result.slot_weights, enc)
    if result.comparison is not None:
        content["comparison"] = _comparison(result.comparison, enc)
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
    content["meta"] = wire.meta(result, result.method)
    return wire.json_response(content)
