"""GET /v1/models: the real models this server can run, and whether each is installed."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from service.core.model import MODELS, model_status
from service.web import wire
from service.web.v1.model_schemas import ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelsResponse, summary="The real models")
def get_models() -> Response:
    """Each model "model" accepts on /v1/tokens: its source, licence and weights' SHA-256,
    whether its package is installed here (and the command that installs it), and whether
    it is loaded (a model loads on first use)."""
    return wire.json_response({"models": [model_status(name) for name in MODELS]})
