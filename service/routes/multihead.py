"""POST /v1/multihead: torch.nn.MultiheadAttention semantics, grouped-query heads included."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import heatmaps, wire
from service.api import multihead_attention
from service.problems import PROBLEM_RESPONSES
from service.schemas import MultiheadRequest, MultiheadResponse, request_body
from service.state import AppState, app_state
from service.weights import head_layout

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


def _check_sizes(req: MultiheadRequest, state: AppState, per_head: bool) -> None:
    """Projection weights and attention weights must fit the limits before anything is made."""
    query = req.query
    key = query if req.key is None else req.key
    value = key if req.value is None else req.value
    if not (2 <= query.ndim <= 3 and key.ndim == query.ndim and value.ndim == query.ndim):
        return  # the Python API names the rank problem
    e, kdim, vdim = query.shape[-1], key.shape[-1], value.shape[-1]
    if e == 0:
        return
    hkv, head_dim = head_layout(e, req.num_heads, req.num_kv_heads)
    if req.weights is None:
        kv = hkv * head_dim
        state.limits.weight_elements("weights", 2 * e * e + kv * (kdim + vdim) + 2 * e + 2 * kv)
    else:
        given = [getattr(req.weights, f) for f in type(req.weights).model_fields]
        state.limits.weight_elements("weights", sum(a.size for a in given if a is not None))
    if req.need_weights or per_head:
        rows = query.shape[:-1]
        heads = (req.num_heads,) if per_head or not req.average_weights else ()
        state.limits.elements("key", rows[:-1] + heads + rows[-1:] + key.shape[-2:-1], "weights")
        if per_head and req.heatmap is not None:
            shape4 = (1,) * (3 - query.ndim) + rows[:-1] + (req.num_heads,)
            shape4 += (query.shape[-2], key.shape[-2])
            heatmaps.check_spec(req.heatmap, shape4, state.limits)  # type: ignore[arg-type]


def _job(state: AppState, body: bytes) -> Response:
    req = wire.validate(MultiheadRequest, wire.parse_json(body), state.settings.max_elements)
    spec = req.heatmap
    per_head = spec is not None  # heatmaps need every head, whatever the response averages
    _check_sizes(req, state, per_head)
    result = multihead_attention(
        req.query,
        req.key,
        req.value,
        num_heads=req.num_heads,
        num_kv_heads=req.num_kv_heads,
        weights=req.weights,
        seed=req.seed,
        average_weights=req.average_weights and not per_head,
        need_weights=req.need_weights or per_head,
        options=req,
        num_threads=state.num_threads,
    )
    weights = result.weights
    drawn: list[dict] = []
    if per_head and weights is not None:
        assert spec is not None
        drawn = heatmaps.draw(
            weights.reshape((1,) * (4 - weights.ndim) + weights.shape),
            spec,
            state.store,
            title="multihead",
        )
        if req.average_weights:
            weights = np.mean(weights, axis=-3)  # what the Python API does when averaging
    enc = req.encoding or "list"
    content: dict = {"output": wire.encode(result.output, enc)}
    if req.need_weights:
        content["weights"] = wire.encode(weights, enc)
        content["lse"] = wire.encode(result.lse, enc)
    content["heatmaps"] = drawn
    content["meta"] = {
        "shape": list(result.output.shape),
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": "exact",
        "param_count": result.param_count,
    }
    return wire.json_response(content)
