"""Heatmaps on the HTTP fronts: the heatmap request, its checks before computing, and publishing.

A request asks for pictures with a HeatmapSpec; `check_*` refuse (422/413, naming the field)
what could not be drawn, before anything is computed; `draw_*` render through service.render
and publish: into the heatmap store (entries with an id and a /v1/heatmaps url) or inline as
base64.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, cast

import numpy as np
from pydantic import BaseModel, Field, field_validator

from service.core.approx import MAP_SIDE
from service.core.errors import InputError
from service.core.options import FAIL_FAST, Ints
from service.render.canvas import Sections
from service.render.model_views import ModelPicture
from service.render.views import (
    RenderedImage,
    image_count,
    render_comparison,
    render_positional,
    render_weights,
)
from service.web.docs import example_config
from service.web.limits import Limits
from service.web.store import Store

URL_PREFIX = "/v1/heatmaps"  # where service.web.v1.heatmaps serves stored images


class HeatmapSpec(BaseModel):
    """Which attention maps to draw. `"heatmap": true` means all defaults."""

    model_config = example_config({"batch": 0, "heads": [0, 1], "inline": False}, extra="forbid")

    batch: int = Field(0, ge=0, description="Batch item to draw.")
    heads: Ints | Literal["all", "mean"] = Field(
        "all",
        description='"all": every head, plus the head mean and one grid image when there are '
        'several; "mean": the head mean only; a list: those heads (plus a grid if several).',
    )
    tokens: Annotated[list[str], FAIL_FAST] | None = Field(
        None,
        description="Tick labels of the key axis (one per key), also used for the query axis "
        "when Lq == Lk.",
    )
    inline: bool = Field(
        False, description="Return the PNGs base64-encoded in the response instead of storing."
    )

    @field_validator("heads")
    @classmethod
    def _nonnegative(cls, v: list[int] | str) -> list[int] | str:
        if isinstance(v, list):
            if not v:
                raise ValueError("heads must not be empty")
            if any(h < 0 for h in v):
                raise ValueError("head indices must be >= 0")
        return v


# ---------------------------------------------------------------------------------------------
# Checks, before computing


def check_spec(spec: HeatmapSpec, shape: tuple[int, ...], limits: Limits) -> None:
    """Refuse (422, naming the field) what cannot be drawn for weights of shape (B, H, Lq, Lk)."""
    b, h, lq, lk = shape
    if h == 0:
        raise InputError("heatmap", "there are no heads to draw (0 heads)")
    if spec.batch >= b:
        raise InputError(("heatmap", "batch"), f"batch {spec.batch} is outside [0, {b})")
    if isinstance(spec.heads, list) and max(spec.heads) >= h:
        raise InputError(("heatmap", "heads"), f"head {max(spec.heads)} is outside [0, {h})")
    if spec.tokens is not None and len(spec.tokens) != lk:
        raise InputError(("heatmap", "tokens"), f"{len(spec.tokens)} labels for {lk} key positions")
    limits.heatmap("heatmap", lq, lk, image_count(h, spec.heads))


def check_store(spec: HeatmapSpec | None, store: Store) -> None:
    """Images to be stored need the store: when it is known to be unreachable, 503 before
    anything is computed (inline images need no store)."""
    if spec is not None and not spec.inline:
        store.check_available()


def check_rows(weights_rows: list[int] | None, spec: HeatmapSpec | None) -> None:
    """weights_rows and a heatmap exclude each other: the rows are a part of the weights, a
    heatmap draws all of them."""
    if weights_rows is not None and spec is not None:
        raise InputError(
            "weights_rows",
            "returns chosen rows of the weights, a heatmap draws all of them: ask for one or "
            "the other",
        )


def check_comparison_spec(spec: HeatmapSpec, shape: tuple[int, ...], limits: Limits) -> None:
    """Refuse what cannot be drawn for a comparison of attention of shape (B, H, Lq, Lk)."""
    b, h, lq, lk = shape
    pq, pk = min(lq, MAP_SIDE), min(lk, MAP_SIDE)
    if spec.tokens is not None and pk != lk:
        raise InputError(
            ("heatmap", "tokens"),
            f"the compared maps are pooled to {pk} key bins for {lk} keys; token labels only "
            f"apply up to {MAP_SIDE} keys",
        )
    check_spec(spec, (b, h, pq, pk), limits)


# ---------------------------------------------------------------------------------------------
# Drawing and publishing


def image_url(image_id: str) -> str:
    return f"{URL_PREFIX}/{image_id}.png"


def publish(images: list[RenderedImage], store: Store, inline: bool) -> list[dict]:
    """Response entries: {"id", "url", "batch", "head"} after storing, or {"png": base64} inline."""
    if inline:
        return [
            {"batch": im.batch, "head": im.head, "png": base64.b64encode(im.png).decode("ascii")}
            for im in images
        ]
    ids = store.put_images([im.png for im in images])
    return [
        {"id": i, "url": image_url(i), "batch": im.batch, "head": im.head}
        for i, im in zip(ids, images, strict=True)
    ]


def publish_one(png: bytes, store: Store, inline: bool) -> dict:
    """{"id", "url"} of a stored image, or {"png": base64} inline."""
    if inline:
        return {"png": base64.b64encode(png).decode("ascii")}
    image_id = store.put_image(png)
    return {"id": image_id, "url": image_url(image_id)}


def draw_weights(
    weights: np.ndarray,
    spec: HeatmapSpec,
    store: Store,
    *,
    title: str,
    sections: Sections | None = None,
) -> list[dict]:
    """Render the maps `spec` asks for from weights (.., H, Lq, Lk) and publish them; `sections`
    (label, width) name consecutive ranges of the keys, drawn with separators."""
    images = render_weights(
        weights.reshape((1,) * (4 - weights.ndim) + weights.shape),
        batch=spec.batch,
        heads=spec.heads,
        tokens=spec.tokens,
        title=title,
        sections=sections,
    )
    return publish(images, store, spec.inline)


def draw_comparison(comparison: dict[str, Any], spec: HeatmapSpec, store: Store) -> list[dict]:
    """Render the heads `spec` asks for (a head list, or "all"/"mean") and publish them."""
    images = render_comparison(comparison, batch=spec.batch, heads=spec.heads)
    return publish(images, store, spec.inline)


def draw_positional(
    table: np.ndarray, positional: str, tokens: list[str] | None, store: Store, inline: bool
) -> dict:
    """The picture of a positional encoding, published."""
    return publish_one(render_positional(table, positional, tokens), store, inline)


def publish_pictures(pictures: list[ModelPicture], store: Store, inline: bool) -> list[dict]:
    """A real model's pictures: {"view", "layer", "heads"} with, stored, their "id", "url" and
    "svg_url" (the same picture as SVG under the same id), or inline the base64 "png"."""
    refs = [{"view": p.view, "layer": p.layer, "heads": p.heads} for p in pictures]
    if inline:
        return [
            {**ref, "png": base64.b64encode(p.png).decode("ascii")}
            for ref, p in zip(refs, pictures, strict=True)
        ]
    svgs = [p.svg for p in pictures]
    ids = store.put_images(
        [p.png for p in pictures], svgs=None if None in svgs else cast(list[bytes], svgs)
    )
    return [
        {**ref, "id": i, "url": image_url(i), "svg_url": f"{URL_PREFIX}/{i}.svg"}
        for ref, i in zip(refs, ids, strict=True)
    ]
