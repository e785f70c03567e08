"""GET /v1/heatmaps/{id}.png: a stored heatmap, cacheable (ETag, Cache-Control)."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.web.deps import StoreDep
from service.web.images import URL_PREFIX
from service.web.problems import PROBLEM_MEDIA_TYPE

router = APIRouter(prefix=URL_PREFIX, tags=["heatmaps"])

_PATH = "/{heatmap_id}.png"
_PROBLEM = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}


def _matches(if_none_match: str, etag: str) -> bool:
    candidates = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


@router.get(
    _PATH,
    response_class=Response,
    summary="A heatmap image",
    responses={
        200: {"content": {"image/png": {}}, "description": "The PNG."},
        304: {"description": "Not modified (If-None-Match matched the ETag)."},
        404: {"description": "Unknown or expired id.", "content": _PROBLEM},
    },
)
def get_heatmap(heatmap_id: str, request: Request, store: StoreDep) -> Response:
    """The PNG stored under an id from a heatmap response. Images never change under an id."""
    # A plain function: FastAPI runs it in its thread pool, so file reads never block the loop.
    image = store.get(heatmap_id)
    if image is None:
        raise HTTPException(404, f"no heatmap {heatmap_id!r}: unknown or expired")
    etag = '"' + hashlib.blake2b(image.data, digest_size=16).hexdigest() + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": f"private, max-age={store.remaining_ttl(image)}, immutable",
    }
    if _matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(image.data, media_type="image/png", headers=headers)


# HEAD (headers only, for caches) shares the GET handler; uvicorn sends no body for it.
router.add_api_route(_PATH, get_heatmap, methods=["HEAD"], include_in_schema=False)
