"""POST /v1/attention: scaled dot-product attention on tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import compare_view, heatmaps, wire
from service.api import AttentionResult, attention
from service.errors import InputError
from service.maps import AttentionMaps, attention_map
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
    spec = req.heatmap
    q, k, v = req.q, req.k, req.v
    ranks_ok = 2 <= q.ndim <= 4 and k.ndim == q.ndim and v.ndim == q.ndim
    lq, lk = (q.shape[-2], k.shape[-2]) if ranks_ok else (0, 0)
    side = state.limits.heatmap_max_side
    # Exact heatmaps longer than the limit are pooled (service/maps.py, O(L) memory) instead
    # of drawn from the dense weights.
    pool = spec is not None and not req.compare and req.method == "exact" and max(lq, lk) > side
    if req.stats and req.method != "exact":
        raise InputError("stats", f'needs method "exact", got "{req.method}"')
    # With "compare", the heatmaps show exact | approximation | difference instead of weights.
    want_weights = req.return_weights or (spec is not None and not req.compare and not pool)
    if ranks_ok:
        # Outputs can be far larger than inputs within the limits: refuse before computing.
        rows = q.shape[:-1]
        state.limits.elements("v", rows + v.shape[-1:], "the output")
        if want_weights:
            state.limits.elements("k", rows + k.shape[-2:-1], "the weights")
        if spec is not None:
            shape4 = (1,) * (4 - q.ndim) + rows + k.shape[-2:-1]
            if pool:
                if spec.tokens is not None and len(spec.tokens) != lk:
                    raise InputError(
                        ("heatmap", "tokens"), f"{len(spec.tokens)} labels for {lk} key positions"
                    )
                spec = spec.model_copy(update={"tokens": None})  # bins have no token labels
                shape4 = shape4[:2] + (min(lq, side), min(lk, side))
                state.limits.elements("heatmap", shape4, "the pooled map")
            check = compare_view.check_spec if req.compare else heatmaps.check_spec
            check(spec, shape4, state.limits)  # type: ignore[arg-type]
        if req.stats:
            state.limits.elements("top_k", rows + (min(req.top_k, lk),), "the top-k indices")
    maps: AttentionMaps | None = None
    if pool or req.stats:
        maps = attention_map(
            q,
            k,
            v,
            req,
            bins=(min(lq, side), min(lk, side)) if pool else 1,
            top_k=req.top_k if req.stats else 0,
            num_threads=state.num_threads,
        )
    if maps is not None and not want_weights:
        result = AttentionResult(
            output=maps.output, weights=None, lse=None, elapsed_ms=maps.elapsed_ms, flops=maps.flops
        )
    else:
        result = attention(
            q,
            k,
            v,
            req,
            num_threads=state.num_threads,
            **({"return_weights": True} if want_weights else {}),
        )
    drawn: list[dict] = []
    if spec is not None and result.comparison is not None:
        drawn = compare_view.draw(result.comparison, spec, state.store)
    elif spec is not None and pool and maps is not None:
        m = maps.pooled
        pq, pk = maps.bins
        title = f"attention pooled {lq}×{lk}→{pq}×{pk} (bin means)"
        drawn = heatmaps.draw(
            m.reshape((1,) * (4 - m.ndim) + m.shape), spec, state.store, title=title
        )
    elif spec is not None and result.weights is not None:
        w = result.weights
        drawn = heatmaps.draw(
            w.reshape((1,) * (4 - w.ndim) + w.shape), spec, state.store, title="attention"
        )
    enc = req.encoding or "list"
    content: dict = {"output": wire.encode(result.output, enc)}
    if req.return_weights:
        content["weights"] = wire.encode(result.weights, enc)
        content["lse"] = wire.encode(result.lse, enc)
    if result.comparison is not None:
        content["comparison"] = compare_view.to_json(result.comparison, enc)
    if req.stats and maps is not None:
        content["stats"] = {
            "entropy": wire.encode(maps.entropy, enc),
            "top_k": {
                "indices": wire.encode(maps.top_k_indices, enc),
                "weights": wire.encode(maps.top_k_weights, enc),
            },
            "column_sums": wire.encode(maps.column_sums, enc),
        }
    content["heatmaps"] = drawn
    content["meta"] = {
        "shape": list(result.output.shape),
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": result.method,
    }
    return wire.json_response(content)
