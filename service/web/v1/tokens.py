"""POST /v1/tokens: token sequence -> embeddings -> positional encoding -> self-attention; or,
with "model", a text through a real pretrained model (service.core.model)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.web import wire
from service.web.deps import AppState, StateDep
from service.web.jobs import run_model, run_tokens
from service.web.problems import PROBLEM_RESPONSES
from service.web.v1.model_schemas import ModelTokensRequest, ModelTokensResponse
from service.web.v1.routing import Responses, json_io
from service.web.v1.schemas import TokensRequest, TokensResponse

router = APIRouter(prefix="/v1", tags=["attention"])


_RESPONSES: Responses = {
    **PROBLEM_RESPONSES,
    404: {
        "description": 'The "model" asked for is not installed on this server (the '
        "detail says how to install it).",
        "content": PROBLEM_RESPONSES[422]["content"],
    },
}


@router.post(
    "/tokens",
    summary="Self-attention over a token sequence, or a real model's attention over a text",
    **json_io(
        (TokensRequest, ModelTokensRequest), TokensResponse | ModelTokensResponse, _RESPONSES
    ),
)
async def post_tokens(request: Request, state: StateDep) -> Response:
    """Without "model": random embeddings (the same token always gets the same embedding for
    a seed), positional encoding, one multi-head self-attention; heatmaps token-labelled.

    With "model" (GET /v1/models lists them): the text through a real pretrained model, every
    layer's and head's attention computed by this service's kernel, the sentence embedding,
    and BertViz's pictures (model view, head view, one head's map) as PNG and SVG."""
    wire.require_json(request.headers)
    return await state.scheduler.run_request("tokens", request, _job, state)


def _job(state: AppState, body: bytes) -> Response:
    data = wire.parse_json(body)
    if isinstance(data, dict) and "model" in data:  # a real model instead of random embeddings
        return _model_job(state, data)
    req = wire.validate(TokensRequest, data, state.settings.max_elements)
    tokens = req.token_list()
    job = run_tokens(
        state, tokens, req, req.heatmap, d_model=req.d_model, positional=req.positional
    )
    result, enc = job.result, req.encoding
    content: dict = {"tokens": tokens, "output": wire.encode(result.output, enc)}
    if req.need_weights:
        content["weights"] = wire.encode(job.weights, enc)
    content["heatmaps"] = job.heatmaps
    content["positional_encoding"] = job.positional
    content["meta"] = wire.meta(
        result,
        "exact",
        param_count=result.param_count,
        positional=req.positional,
        d_model=req.d_model,
        num_heads=req.num_heads,
    )
    return wire.json_response(content)


def _model_job(state: AppState, data: dict) -> Response:
    req = wire.validate(ModelTokensRequest, data, state.settings.max_elements)
    spec = req.heatmap
    job = run_model(
        state,
        req.model,
        req.text,
        req.text_pair,
        truncate=req.truncate,
        layers=req.layers,
        heads=req.heads,
        need_weights=req.need_weights,
        views=None if spec is None else spec.views,
        inline=spec is not None and spec.inline,
    )
    a, enc = job.analysis, req.encoding
    content: dict = {
        "model": req.model,
        "tokens": a.encoding.tokens,
        "token_type_ids": a.encoding.type_ids.tolist(),
        "layers": list(a.layers),
        "heads": list(a.heads),
    }
    if req.need_weights:
        content["weights"] = wire.encode(a.attentions, enc)
    content["embedding"] = wire.encode(a.embedding, enc)
    content["heatmaps"] = job.heatmaps
    content["notes"] = job.notes
    content["meta"] = {
        "wordpieces": a.encoding.full_length,
        "truncated": a.encoding.truncated,
        "embedding_wordpieces": a.embedding_length,
        "embedding_truncated": a.embedding_truncated,
        "num_layers": job.model.num_layers,
        "num_heads": job.model.num_heads,
        "elapsed_ms": a.elapsed_ms,
        "kernel_ms": a.kernel_ms,
    }
    return wire.json_response(content)
