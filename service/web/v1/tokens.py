"""POST /v1/tokens: token sequence -> embeddings -> positional encoding -> self-attention."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.web import wire
from service.web.deps import AppState, StateDep
from service.web.docs import request_body
from service.web.jobs import run_tokens
from service.web.problems import PROBLEM_RESPONSES
from service.web.v1.schemas import TokensRequest, TokensResponse

router = APIRouter(prefix="/v1", tags=["attention"])


@router.post(
    "/tokens",
    response_model=TokensResponse,
    responses=PROBLEM_RESPONSES,
    openapi_extra=request_body(TokensRequest),
    summary="Self-attention over a token sequence",
)
async def post_tokens(request: Request, state: StateDep) -> Response:
    """The same token always gets the same embedding for a seed; heatmaps are token-labelled."""
    return await state.scheduler.run_request("tokens", request, _job, state)


def _job(state: AppState, body: bytes) -> Response:
    req = wire.validate(TokensRequest, wire.parse_json(body), state.settings.max_elements)
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
