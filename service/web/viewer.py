"""GET /: the web viewer (one static page), and its files under /static/."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from starlette.responses import FileResponse, Response

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent / "static"
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# Everything the page needs comes from this service (no CDN); blob: and data: are the images
# the page makes itself from fetched PNGs.
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def _files() -> dict[str, Path]:
    # A fixed set, read once: a request can name only these files, never a path.
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in _MEDIA_TYPES}


_FILES = _files()


def _serve(name: str, cache_control: str) -> Response:
    path = _FILES.get(name)
    if path is None:
        raise HTTPException(404, f"no static file named {name!r}")
    return FileResponse(
        path,
        media_type=_MEDIA_TYPES[path.suffix],
        headers={
            # ETag and Last-Modified come with FileResponse; revalidate so upgrades show at once.
            "Cache-Control": cache_control,
            "X-Content-Type-Options": "nosniff",
            **({"Content-Security-Policy": _CSP} if path.suffix == ".html" else {}),
        },
    )


@router.api_route("/", methods=["GET", "HEAD"], summary="The web viewer")
async def index() -> Response:
    return _serve("index.html", "no-cache")


@router.api_route("/model", methods=["GET", "HEAD"], summary="The web viewer's real-model mode")
async def model_page() -> Response:
    return _serve("model.html", "no-cache")


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static_file(name: str) -> Response:
    return _serve(name, "no-cache")
