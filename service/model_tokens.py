"""The job behind /v1/tokens with "model": a real model's attention, embedding and pictures.

Tokenise, check every limit against the input's length (weights, images), run the model (each
layer's attention one call to our kernel), draw the pictures asked for (each stored as PNG and
as SVG under one id), answer. The model loads on first use and is shared by every request.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

from service import wire
from service.cancel import checkpoint
from service.core.model import (
    ModelIntegrityError,
    ModelNotInstalled,
    SentenceModel,
    get_model,
    model_status,
)
from service.model_schemas import MODELS, ModelTokensRequest
from service.problems import ServiceError
from service.render import model_views
from service.state import AppState
from service.store import HeatmapStore


class ModelNotAvailable(ServiceError):
    """The model's package is not installed here: 404, like a model a server does not have."""

    status, slug, title = 404, "model-not-installed", "Model not installed"


class ModelRefused(ServiceError):
    """The model's files failed their checks (hash, shapes): the server will not run them."""

    status, slug, title = 503, "model-refused", "Model refused"


def load_model(name: str) -> SentenceModel:
    try:
        return get_model(name)
    except ModelNotInstalled as exc:
        raise ModelNotAvailable(str(exc)) from None
    except ModelIntegrityError as exc:
        raise ModelRefused(f"model {name!r} cannot run on this server: {exc}") from None


def models_listing() -> dict[str, Any]:
    return {"models": [model_status(name) for name in MODELS]}


def _image_count(views: Sequence[str], layers: int, heads: int) -> int:
    per_view = {"model": 1, "head": layers, "map": layers * heads}
    return sum(per_view[v] for v in views)


def run(state: AppState, req: ModelTokensRequest) -> dict[str, Any]:
    """The response body of one request (limits checked before the model runs)."""
    model = load_model(req.model)
    prepared = model.prepare(
        req.text, req.text_pair, truncate=req.truncate, layers=req.layers, heads=req.heads
    )
    enc = prepared.encoding
    n, nl, nh = len(enc), len(prepared.layers), len(prepared.heads)
    # The kernel makes one (heads, L, L) tensor per layer, and the model has a fixed number of
    # layers (6 for MiniLM), so a layer is what ATTN_MAX_ELEMENTS bounds: the defaults admit
    # every weight of a 512-wordpiece input (6 x 12 x 512 x 512 in all).
    if req.need_weights or req.heatmap is not None:
        state.limits.elements("heads", (nh, n, n), f"each of the {nl} layers' attention weights")
    spec = req.heatmap
    if spec is not None:
        state.limits.heatmap("heatmap", n, n, _image_count(spec.views, nl, nh))
    analysis = model.analyse_prepared(prepared, num_threads=state.num_threads)
    images = _draw(req, analysis, state.store) if spec is not None else []
    notes = []
    if enc.truncated:
        notes.append(
            f"the input has {enc.full_length} wordpieces; the model read the first "
            f"{n} (its {model.max_positions} positions)"
        )
    if analysis.embedding_truncated:
        notes.append(
            f"the embedding was computed from the first {analysis.embedding_length} of "
            f"{enc.full_length} wordpieces, as sentence-transformers computes it for this model "
            f"(max_seq_length {model.embedding_max_length})"
        )
    content: dict[str, Any] = {
        "model": req.model,
        "tokens": enc.tokens,
        "token_type_ids": enc.type_ids.tolist(),
        "layers": list(analysis.layers),
        "heads": list(analysis.heads),
    }
    if req.need_weights:
        content["weights"] = wire.encode(analysis.attentions, req.encoding)
    content["embedding"] = wire.encode(analysis.embedding, req.encoding)
    content["heatmaps"] = images
    content["notes"] = notes
    content["meta"] = {
        "wordpieces": enc.full_length,
        "truncated": enc.truncated,
        "embedding_wordpieces": analysis.embedding_length,
        "embedding_truncated": analysis.embedding_truncated,
        "num_layers": model.num_layers,
        "num_heads": model.num_heads,
        "elapsed_ms": analysis.elapsed_ms,
        "kernel_ms": analysis.kernel_ms,
    }
    return content


def _draw(req: ModelTokensRequest, a: Any, store: HeatmapStore) -> list[dict[str, Any]]:
    """Every picture the spec asks for, as PNG and SVG; stored (or inline PNGs)."""
    assert req.heatmap is not None
    views = req.heatmap.views
    tokens = a.encoding.tokens
    name = req.model
    heads = list(a.heads)
    drawn: list[tuple[dict[str, Any], Any]] = []
    if "model" in views:
        drawn.append(
            (
                {"view": "model", "layer": None, "heads": heads},
                lambda fmt: model_views.model_view(
                    a.attentions, layers=a.layers, heads=a.heads, title=name, fmt=fmt
                ),
            )
        )
    for i, layer in enumerate(a.layers):
        if "head" in views:
            drawn.append(
                (
                    {"view": "head", "layer": layer, "heads": heads},
                    lambda fmt, i=i, layer=layer: model_views.head_view(
                        a.attentions[i], tokens, layer=layer, heads=a.heads, title=name, fmt=fmt
                    ),
                )
            )
        if "map" in views:
            for k, head in enumerate(a.heads):
                drawn.append(
                    (
                        {"view": "map", "layer": layer, "heads": [head]},
                        lambda fmt, i=i, k=k, layer=layer, head=head: model_views.head_map(
                            a.attentions[i, k],
                            tokens,
                            title=f"{name}, layer {layer}, head {head}",
                            fmt=fmt,
                        ),
                    )
                )
    inline = req.heatmap.inline
    refs = []
    pngs, svgs = [], []
    for ref, draw in drawn:
        checkpoint()  # an abandoned request stops between pictures
        pngs.append(draw("png"))
        if not inline:
            svgs.append(draw("svg"))
        refs.append(ref)
    if inline:
        return [
            {**ref, "png": base64.b64encode(png).decode("ascii")}
            for ref, png in zip(refs, pngs, strict=True)
        ]
    ids = store.put_many(pngs, svgs=svgs)
    return [
        {
            **ref,
            "id": image_id,
            "url": f"/v1/heatmaps/{image_id}.png",
            "svg_url": f"/v1/heatmaps/{image_id}.svg",
        }
        for ref, image_id in zip(refs, ids, strict=True)
    ]
