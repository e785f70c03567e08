"""GET /v1/heatmaps/{id}.png (and .svg): a stored heatmap, cacheable (ETag, Cache-Control)."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.problems import PROBLEM_MEDIA_TYPE
from service.state import app_state

router = APIRouter(tags=["heatmaps"])

_PATH = "/v1/heatmaps/{heatmap_id}.png"
_SVG_PATH = "/v1/heatmaps/{heatmap_id}.svg"
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
def get_heatmap(heatmap_id: str, request: Request) -> Response:
    """The PNG stored under an id from a heatmap response. Images never change under an id."""
    return _serve(request, heatmap_id, ".png", "image/png")


@router.get(
    _SVG_PATH,
    response_class=Response,
    summary="A heatmap image as SVG",
    responses={
        200: {"content": {"image/svg+xml": {}}, "description": "The SVG."},
        304: {"description": "Not modified (If-None-Match matched the ETag)."},
        404: {"description": "Unknown or expired id, or no SVG kept.", "content": _PROBLEM},
    },
)
def get_heatmap_svg(heatmap_id: str, request: Request) -> Response:
    """The same picture as the PNG of this id, as SVG: kept for a real model's pictures
    ("model": "minilm-l6" on /v1/tokens), whose references carry an svg_url."""
    return _serve(request, heatmap_id, ".svg", "image/svg+xml")


def _serve(request: Request, heatmap_id: str, suffix: str, media_type: str) -> Response:
    # Plain functions: FastAPI runs them in its thread pool, so file reads never block the loop.
    store = app_state(request).store
    image = store.get(heatmap_id, suffix)
    if image is None:
        if suffix == ".svg" and store.get(heatmap_id) is not None:
            raise HTTPException(
                404,
                f"heatmap {heatmap_id!r} has no SVG: SVGs are kept for the real model's "
                "pictures (/v1/tokens with a model); fetch the .png",
            )
        raise HTTPException(404, f"no heatmap {heatmap_id!r}: unknown or expired")
    etag = '"' + hashlib.blake2b(image.data, digest_size=16).hexdigest() + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": f"private, max-age={store.remaining_ttl(image)}, immutable",
    }
    if suffix == ".svg":  # an SVG is a document: it may show its own data: images, nothing else
        headers["Content-Security-Policy"] = (
            "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
        )
    if _matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(image.data, media_type=media_type, headers=headers)


# HEAD (headers only, for caches) shares the GET handler; uvicorn sends no body for it.
router.add_api_route(_PATH, get_heatmap, methods=["HEAD"], include_in_schema=False)
router.add_api_route(_SVG_PATH, get_heatmap_svg, methods=["HEAD"], include_in_schema=False)
