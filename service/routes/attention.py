"""POST /v1/attention: scaled dot-product attention on tensors."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import compare_view, heatmaps, wire
from service.api import attention
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
    # With "compare", the heatmaps show exact | approximation | difference instead of weights.
    want_weights = req.return_weights or (spec is not None and not req.compare)
    q, k, v = req.q, req.k, req.v
    if 2 <= q.ndim <= 4 and k.ndim == q.ndim and v.ndim == q.ndim:
        # Outputs can be far larger than inputs within the limits: refuse before computing.
        rows = q.shape[:-1]
        state.limits.elements("v", rows + v.shape[-1:], "the output")
        if want_weights:
            state.limits.elements("k", rows + k.shape[-2:-1], "the weights")
        if spec is not None:
            shape4 = (1,) * (4 - q.ndim) + rows + k.shape[-2:-1]
            check = compare_view.check_spec if req.compare else heatmaps.check_spec
            check(spec, shape4, state.limits)  # type: ignore[arg-type]
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
    content["heatmaps"] = drawn
    content["meta"] = {
        "shape": list(result.output.shape),
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": result.method,
    }
    return wire.json_response(content)
