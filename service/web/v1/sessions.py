"""/v1/sessions: recurrent memory streamed segment by segment (service.web.sessions keeps the
state in the store; service.core.sessions computes).

    POST   /v1/sessions                  open one: 201 {"id", "expires_at", "position": 0, ...}
    POST   /v1/sessions/{id}/segments    append a segment: {"output", "position", "memory", ...}
    GET    /v1/sessions/{id}             where it stands
    DELETE /v1/sessions/{id}             204
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from service.core.errors import InputError
from service.core.sessions import SessionOptions
from service.web import sessions, wire
from service.web.deps import AppState, StateDep
from service.web.problems import PROBLEM_MEDIA_TYPE, PROBLEM_RESPONSES
from service.web.v1.routing import json_io
from service.web.v1.session_schemas import (
    SegmentRequest,
    SegmentResponse,
    SessionCreateRequest,
    SessionInfo,
)

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

_PROBLEM = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "Unknown or expired session.", "content": _PROBLEM}
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PROBLEM_RESPONSES,
    **_NOT_FOUND,
    409: {
        "description": "Another segment was appended meanwhile; this one was not: send it again.",
        "content": _PROBLEM,
    },
    503: {
        "description": "Overloaded, or ATTN_SESSION_MAX sessions open (with Retry-After).",
        "content": _PROBLEM,
    },
}
# The API key (already checked by the guard) decides who owns a session.
Authorization = Annotated[str | None, Header(include_in_schema=False)]


@router.post(
    "",
    status_code=201,
    summary="Open a memory session",
    **json_io(SessionCreateRequest, SessionInfo, _RESPONSES),
)
async def create_session(
    request: Request, state: StateDep, authorization: Authorization = None
) -> Response:
    """A session keeps a stream's recurrent memory between its segments: the raw keys and
    values of its `memory.length` most recent positions and `memory.compressed` slots pooled
    from older ones by `memory.rate`. Streaming a sequence in segments of S gives exactly
    /v1/attention's answer with `memory.segment` = S."""
    wire.require_json(request.headers)
    body = await request.body()
    owner = sessions.owner_of(state, authorization)
    return await run_in_threadpool(_create, state, owner, body)


def _create(state: AppState, owner: str, body: bytes) -> Response:
    req = wire.validate(SessionCreateRequest, wire.parse_json(body), state.settings.max_elements)
    most = state.settings.session_ttl_s
    if req.ttl_s is not None and req.ttl_s > most:
        raise InputError("ttl_s", f"{req.ttl_s} s is more than ATTN_SESSION_TTL_S={most} s")
    options = SessionOptions.model_validate(req.model_dump(exclude={"ttl_s"}))
    session = sessions.open_session(state, owner, options, req.ttl_s or most)
    response = wire.json_response(session.info(), status_code=201)
    response.headers["Location"] = f"{router.prefix}/{session.key}"
    return response


@router.post(
    "/{session_id}/segments",
    summary="Append a segment",
    **json_io(SegmentRequest, SegmentResponse, _RESPONSES),
)
async def append_segment(
    session_id: str, request: Request, state: StateDep, authorization: Authorization = None
) -> Response:
    """Attention for one segment with the session's memory; the memory moves on by the
    segment. `"heatmap": true` draws the segment's keys as [compressed | memory | segment]."""
    wire.require_json(request.headers)
    owner = sessions.owner_of(state, authorization)
    return await state.scheduler.run_request("session", request, _append, state, session_id, owner)


def _append(state: AppState, session_id: str, owner: str, body: bytes) -> Response:
    session = sessions.load(state, owner, session_id)  # 404 before reading tensors
    data = wire.parse_json(body, wire.tensor_fields(SegmentRequest))
    req = wire.validate(SegmentRequest, data, state.settings.max_elements)
    done = sessions.append_segment(
        state, session, req.q, req.k, req.v, return_weights=req.return_weights, spec=req.heatmap
    )
    result, enc = done.result, req.encoding or "list"
    content: dict = {"output": wire.encode(result.output, enc)}
    if req.return_weights:
        content["weights"] = wire.encode(result.weights, enc)
        content["lse"] = wire.encode(result.lse, enc)
    content["position"] = result.position
    content["memory"] = {"raw": result.memory_raw, "compressed": result.memory_compressed}
    content["expires_at"] = sessions.timestamp(done.session.expires_at)
    content["heatmaps"] = done.heatmaps
    content["meta"] = wire.meta(result, "exact")
    return wire.json_response(content)


@router.get("/{session_id}", response_model=SessionInfo, responses=_NOT_FOUND, summary="A session")
def get_session(session_id: str, state: StateDep, authorization: Authorization = None) -> Response:
    """Where the session stands: its position, expiry, options, and the memory it holds for
    the next segment."""
    owner = sessions.owner_of(state, authorization)
    return wire.json_response(sessions.load(state, owner, session_id).info())


@router.delete(
    "/{session_id}",
    status_code=204,
    response_class=Response,
    responses=_NOT_FOUND,
    summary="End a session",
)
def delete_session(
    session_id: str, state: StateDep, authorization: Authorization = None
) -> Response:
    """Drop the session and its memory."""
    sessions.delete(state, sessions.owner_of(state, authorization), session_id)
    return Response(status_code=204)
