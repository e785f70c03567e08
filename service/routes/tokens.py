"""POST /v1/tokens: token sequence -> embeddings -> positional encoding -> self-attention."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service import heatmaps, model_tokens, wire
from service.model_schemas import ModelTokensRequest, ModelTokensResponse
from service.problems import PROBLEM_RESPONSES
from service.schemas import TokensRequest, TokensResponse, request_body
from service.state import AppState, app_state
from service.tokens import self_attention
from service.weights import head_layout

router = APIRouter(tags=["attention"])


@router.post(
    "/v1/tokens",
    response_model=TokensResponse | ModelTokensResponse,
    responses={
        **PROBLEM_RESPONSES,
        404: {
            "description": 'The "model" asked for is not installed on this server (the '
            "detail says how to install it).",
            "content": PROBLEM_RESPONSES[422]["content"],
        },
    },
    openapi_extra=request_body(TokensRequest, ModelTokensRequest),
    summary="Self-attention over a token sequence, or a real model's attention over a text",
)
async def post_tokens(request: Request) -> Response:
    """Without "model": random embeddings (the same token always gets the same embedding for
    a seed), positional encoding, one multi-head self-attention; heatmaps token-labelled.

    With "model" (GET /v1/models lists them): the text through a real pretrained model, every
    layer's and head's attention computed by this service's kernel, the sentence embedding,
    and BertViz's pictures (model view, head view, one head's map) as PNG and SVG."""
    state = app_state(request)
    state.core.raise_if_full("tokens")
    body = await request.body()
    return await state.core.run("tokens", _job, state, body, receive=request.receive)


def _job(state: AppState, body: bytes) -> Response:
    data = wire.parse_json(body)
    if isinstance(data, dict) and "model" in data:  # a real model instead of random embeddings
        req_model = wire.validate(ModelTokensRequest, data, state.settings.max_elements)
        return wire.json_response(model_tokens.run(state, req_model))
    req = wire.validate(TokensRequest, data, state.settings.max_elements)
    tokens = req.token_list()
    n, d, h = len(tokens), req.d_model, req.num_heads
    spec = req.heatmap
    # Everything this request would allocate is checked before embedding a single token.
    limits = state.limits
    hkv, head_dim = head_layout(d, h, req.num_kv_heads)
    limits.weight_elements(
        "d_model", 2 * d * d + 2 * hkv * head_dim * d + 2 * d + 2 * hkv * head_dim
    )
    limits.elements("tokens", (n, d), "the embeddings")
    limits.elements("tokens", (h, n, n), "the weights")
    if spec is not None:
        if spec.tokens is None:
            spec = spec.model_copy(update={"tokens": tokens})
        heatmaps.check_spec(spec, (1, h, n, n), limits)
    result = self_attention(
        tokens,
        d_model=d,
        num_heads=h,
        num_kv_heads=req.num_kv_heads,
        positional=req.positional,
        seed=req.seed,
        weights=req.weights,
        masking=req,
        num_threads=state.num_threads,
    )
    drawn: list[dict] = []
    picture = None
    if spec is not None:
        drawn = heatmaps.draw(result.weights[None], spec, state.store, title="tokens")
        if result.positional is not None:
            png = heatmaps.render_map(
                result.positional,
                title=f"{req.positional} positional encoding",
                xlabel="cos | sin of the rotation angles"
                if req.positional == "rope"
                else "dimension",
                ylabel="position",
                ylabels=tokens if n <= 1024 else None,
                diverging=True,
            )
            picture = heatmaps.publish_one(png, state.store, spec.inline)
    weights = result.weights.mean(axis=0) if req.average_weights else result.weights
    enc = req.encoding
    content: dict = {"tokens": tokens, "output": wire.encode(result.output, enc)}
    if req.need_weights:
        content["weights"] = wire.encode(weights, enc)
    content["heatmaps"] = drawn
    content["positional_encoding"] = picture
    content["meta"] = {
        "shape": list(result.output.shape),
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": "exact",
        "param_count": result.param_count,
        "positional": req.positional,
        "d_model": d,
        "num_heads": h,
    }
    return wire.json_response(content)
