"""GET /v1/heatmaps/{id}.png (and .svg): a stored heatmap, cacheable (ETag, Cache-Control)."""

from __future__ import annotations

import hashlib

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from service.web.deps import StoreDep
from service.web.images import URL_PREFIX
from service.web.problems import PROBLEM_MEDIA_TYPE
from service.web.store import PNG, SVG, Store

router = APIRouter(prefix=URL_PREFIX, tags=["heatmaps"])

_MEDIA_TYPES = {".png": "image/png", ".svg": "image/svg+xml"}
_PROBLEM = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
# An SVG is a document: it may show its own data: images and styles, and load nothing.
_SVG_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _matches(if_none_match: str, etag: str) -> bool:
    candidates = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in candidates or etag in candidates


def _route(suffix: str, name: str, summary: str, doc: str) -> None:
    """GET (and HEAD, for caches: uvicorn sends no body) /v1/heatmaps/{id}<suffix>."""

    def endpoint(heatmap_id: str, request: Request, store: StoreDep) -> Response:
        # A plain function: FastAPI runs it in its thread pool, so reads never block the loop.
        return _serve(request, store, heatmap_id, suffix)

    endpoint.__name__, endpoint.__doc__ = name, doc
    path = "/{heatmap_id}" + suffix
    router.add_api_route(
        path,
        endpoint,
        methods=["GET"],
        response_class=Response,
        summary=summary,
        responses={
            200: {
                "content": {_MEDIA_TYPES[suffix]: {}},
                "description": f"The {suffix[1:].upper()}.",
            },
            304: {"description": "Not modified (If-None-Match matched the ETag)."},
            404: {"description": "Unknown or expired id.", "content": _PROBLEM},
            503: {
                "description": "The state store (Redis) is unreachable; retry after "
                "Retry-After. Never a 404 for an image that may exist.",
                "content": _PROBLEM,
            },
        },
    )
    router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)


def _serve(request: Request, store: Store, heatmap_id: str, suffix: str) -> Response:
    image = store.get_image(heatmap_id, suffix)
    if image is None:
        if suffix == SVG and store.get_image(heatmap_id, PNG) is not None:
            raise HTTPException(
                404,
                f"heatmap {heatmap_id!r} has no SVG: SVGs are kept for the real model's "
                "pictures (/v1/tokens with a model); fetch the .png",
            )
        raise HTTPException(404, f"no heatmap {heatmap_id!r}: unknown or expired")
    etag = '"' + hashlib.blake2b(image.data, digest_size=16).hexdigest() + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": f"private, max-age={image.remaining_ttl()}, immutable",
    }
    if suffix == ".svg":
        headers["Content-Security-Policy"] = _SVG_CSP
    if _matches(request.headers.get("if-none-match", ""), etag):
        return Response(status_code=304, headers=headers)
    return Response(image.data, media_type=_MEDIA_TYPES[suffix], headers=headers)


_route(
    ".png",
    "get_heatmap",
    "A heatmap image",
    "The PNG stored under an id from a heatmap response. Images never change under an id.",
)
_route(
    ".svg",
    "get_heatmap_svg",
    "A heatmap image as SVG",
    "The same picture as the PNG of this id, as SVG: kept for a real model's pictures "
    '("model" on /v1/tokens), whose references carry an svg_url; 404 for other heatmaps.',
)
