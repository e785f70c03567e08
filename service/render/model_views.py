"""BertViz's pictures of a real model's attention, as PNG or SVG: pure functions of the weights.

- model view: a layers x heads grid of small maps (query rows by key columns), one colour scale;
- head view: the wordpieces twice, queries on the left and keys on the right, joined by lines
  whose opacity is the weight, one colour per head (one or several heads of one layer);
- head map: one head's map with the wordpieces as labels on both axes.

Long inputs: the model view's maps are pooled into bins of mean weight (the exact maps'
pooling, service.approx) when a map has more positions than its panel has pixels, and say so;
the head view leaves out lines under 1 % (a line that faint is not visible), draws at most the
20,000 heaviest lines (a 512-wordpiece input has ~90,000 over 1 % in 12 heads) and thins its
labels, and says so under the picture.

Each call builds its own matplotlib Figure (object API, no pyplot), so threads never share one.
The same figure is written as PNG or SVG, so the two downloads are the same picture.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from service.core.approx.pooling import pool_dense
from service.core.cancel import checkpoint
from service.render.canvas import _short, _ticks

ImageFormat = Literal["png", "svg"]
ModelView = Literal["model", "head", "map"]

_DPI = 100
_PANEL_PX = 80  # a model view panel's side; maps longer than this are pooled to it
_MIN_LINE_WEIGHT = 0.01  # head view: lighter lines are not drawn (opacity under 1 %)
_MAX_LINES = 20_000  # head view: beyond this many lines the lightest are left out
_MAX_LABELS = 256  # head view: more wordpiece labels than this per column are thinned
# One colour per head: matplotlib's tab10 and two more of tab20b (BertViz cycles d3's 10).
_HEAD_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
)


def head_colour(head: int) -> str:
    """The head view's colour of a head (the viewer draws with the same colours)."""
    return _HEAD_COLOURS[head % len(_HEAD_COLOURS)]


def _save(fig: Figure, fmt: ImageFormat) -> bytes:
    out = io.BytesIO()
    if fmt == "png":
        fig.savefig(out, format="png", dpi=_DPI, pil_kwargs={"compress_level": 1})
    elif fmt == "svg":
        # Text as paths (the default): the file shows the same glyphs everywhere, offline.
        fig.savefig(out, format="svg", dpi=_DPI, metadata={"Date": None})
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return out.getvalue()


def panel_maps(attentions: np.ndarray) -> np.ndarray:
    """The model view's maps: as they are, or pooled to bins of mean weight when a side is
    longer than a panel's pixels (edges (arange(P + 1) * L) // P, as the exact maps')."""
    lq, lk = attentions.shape[-2:]
    pq, pk = min(lq, _PANEL_PX), min(lk, _PANEL_PX)
    if (pq, pk) == (lq, lk):
        return attentions
    return pool_dense(attentions, pq, pk)


def model_view(
    attentions: np.ndarray,
    *,
    layers: Sequence[int],
    heads: Sequence[int],
    title: str,
    fmt: ImageFormat = "png",
) -> bytes:
    """attentions (len(layers), len(heads), Lq, Lk): one small map per layer (rows) and head
    (columns), sharing one colour scale from 0 to the largest weight."""
    n_layers, n_heads, lq, lk = attentions.shape
    if (n_layers, n_heads) != (len(layers), len(heads)):
        raise ValueError("attentions do not match the layers and heads named")
    maps = panel_maps(attentions)
    pq, pk = maps.shape[-2:]
    pooled = (pq, pk) != (lq, lk)
    top = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    # One image of every panel with white gaps between them (NaN), drawn by one imshow: a
    # subplot per panel would cost 72 axes, ten times the drawing time.
    gap = max(1, round(max(pq, pk) / 10))
    mosaic = np.full((n_layers * (pq + gap) - gap, n_heads * (pk + gap) - gap), np.nan, np.float32)
    for r in range(n_layers):
        for c in range(n_heads):
            mosaic[r * (pq + gap) : r * (pq + gap) + pq, c * (pk + gap) : c * (pk + gap) + pk] = (
                maps[r, c]
            )
    panel = 0.95
    width, height = panel * n_heads + 1.6, panel * n_layers + 1.0
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((0.9 / width, 0.25 / height, 1 - 1.6 / width, 1 - 0.8 / height))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(mosaic, cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    for c, head in enumerate(heads):
        x = c * (pk + gap) + (pk - 1) / 2
        ax.text(x, -0.6 * gap, f"head {head}", ha="center", va="bottom", fontsize=8)
    for r, layer in enumerate(layers):
        y = r * (pq + gap) + (pq - 1) / 2
        ax.text(-gap, y, f"layer {layer}", ha="right", va="center", fontsize=8, rotation=90)
    cax = fig.add_axes((1 - 0.55 / width, 0.1, 0.012, 0.72))
    fig.colorbar(image, cax=cax).ax.tick_params(labelsize=7)
    note = f" (pooled to {pq}x{pk} bins of mean weight)" if pooled else ""
    fig.suptitle(f"{title}: {lq} queries x {lk} keys{note}", fontsize=10, y=0.995)
    return _save(fig, fmt)


def _line_floor(attentions: np.ndarray) -> float:
    """The lightest weight drawn: 1 %, raised so that at most _MAX_LINES lines are drawn."""
    visible = attentions[attentions >= _MIN_LINE_WEIGHT]
    if visible.size <= _MAX_LINES:
        return _MIN_LINE_WEIGHT
    return float(np.partition(visible, visible.size - _MAX_LINES)[visible.size - _MAX_LINES])


def _line_colours(weights: np.ndarray, colour: str) -> np.ndarray:
    rgba = np.tile(np.asarray(to_rgba(colour)), (weights.size, 1))
    rgba[:, 3] = np.clip(weights, 0.0, 1.0)
    return rgba


def head_view(
    attentions: np.ndarray,
    tokens: Sequence[str],
    *,
    layer: int,
    heads: Sequence[int],
    title: str,
    fmt: ImageFormat = "png",
) -> bytes:
    """attentions (len(heads), L, L) of one layer: each query i (left) joined to each key j
    (right) by a line of its head's colour whose opacity is the weight (lines under 1 % are
    not drawn). Several heads overlay their lines, each in its own colour."""
    n_heads, lq, lk = attentions.shape
    if n_heads != len(heads) or lq != len(tokens) or lk != len(tokens):
        raise ValueError("attentions do not match the heads and tokens named")
    n = len(tokens)
    row = 0.16 if n <= 64 else max(0.075, 0.16 * 64 / n)
    height = min(0.75 + 0.2 * math.ceil(len(heads) / 6) + row * n, 60.0)
    fig = Figure(figsize=(6.0, height))
    top = 0.35 + 0.2 * math.ceil(len(heads) / 6)  # inches above the rows: title and legend
    ax = fig.add_axes((0.0, 0.15 / height, 1.0, 1 - (top + 0.15) / height))
    ax.set_axis_off()
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(max(n, 1) - 0.5, -0.5)
    x_left, x_right = 0.33, 0.67
    floor = _line_floor(attentions)
    segments, colours = [], []
    for k, head in enumerate(heads):
        rows, cols = np.nonzero(attentions[k] >= floor)
        seg = np.empty((rows.size, 2, 2))
        seg[:, 0, 0], seg[:, 0, 1] = x_left, rows
        seg[:, 1, 0], seg[:, 1, 1] = x_right, cols
        segments.append(seg)
        colours.append(_line_colours(attentions[k][rows, cols], head_colour(head)))
    # An (N, 2, 2) array is N segments (matplotlib's annotation wants a sequence).
    lines = LineCollection(
        cast(Any, np.concatenate(segments)),
        colors=np.concatenate(colours),
        linewidths=1.6 if n <= 64 else 0.8,
    )
    ax.add_collection(lines)
    font = 9 if n <= 64 else 7 if n <= 160 else 5
    step = max(1, math.ceil(n / _MAX_LABELS))
    for i in range(0, n, step):
        label = _short(tokens[i])
        ax.text(x_left - 0.02, i, label, ha="right", va="center", fontsize=font, parse_math=False)
        ax.text(x_right + 0.02, i, label, ha="left", va="center", fontsize=font, parse_math=False)
    fig.text(0.02, 1 - 0.12 / height, "query", fontsize=8, va="top", color="#555")
    fig.text(0.98, 1 - 0.12 / height, "key", fontsize=8, va="top", ha="right", color="#555")
    fig.text(0.5, 1 - 0.08 / height, f"{title}, layer {layer}", ha="center", va="top", fontsize=10)
    fig.legend(
        handles=[Line2D([], [], color=head_colour(h), lw=2, label=f"head {h}") for h in heads],
        loc="upper center",
        bbox_to_anchor=(0.5, 1 - 0.28 / height),
        ncol=min(len(heads), 6),
        fontsize=7,
        frameon=False,
        handlelength=1.2,
        columnspacing=1.0,
    )
    notes = [f"lines under {floor:.2g} not drawn"] if floor > _MIN_LINE_WEIGHT else []
    notes += [f"one label in {step} shown"] if step > 1 else []
    if notes:
        fig.text(0.5, 0.05 / height, "; ".join(notes), ha="center", fontsize=7)
    return _save(fig, fmt)


def head_map(
    matrix: np.ndarray, tokens: Sequence[str], *, title: str, fmt: ImageFormat = "png"
) -> bytes:
    """One head's (L, L) map, queries as rows, keys as columns, labelled with the wordpieces."""
    lq, lk = matrix.shape
    if lq != len(tokens) or lk != len(tokens):
        raise ValueError("the map does not match the tokens")
    side = 6.4 if lk <= 64 else 8.0
    fig = Figure(figsize=(side + 1.0, side))
    margin = 0.2 if lk <= 64 else 0.14
    ax = fig.add_axes((margin, margin, 0.8 - margin, 0.92 - margin))
    image = ax.imshow(
        matrix,
        cmap="viridis",
        vmin=0.0,
        vmax=max(float(matrix.max()) if matrix.size else 1.0, 1e-12),
        interpolation="nearest",
        aspect="auto",
    )
    xpos, xtext = _ticks(lk, tokens)
    font = 8 if lk <= 64 else 6 if lk <= 128 else 4
    ax.set_xticks(xpos, xtext, rotation=90, fontsize=font, parse_math=False)
    ax.set_yticks(xpos, xtext, fontsize=font, parse_math=False)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    cax = fig.add_axes((0.83, margin, 0.025, 0.92 - margin))
    fig.colorbar(image, cax=cax)
    fig.text(0.5, 0.985, title, ha="center", va="top", fontsize=11, parse_math=False)
    return _save(fig, fmt)


# ---------------------------------------------------------------------------------------------
# The pictures of one input: which view shows which layers and heads


@dataclass(frozen=True)
class ModelPicture:
    """One picture of a model's attention: "model" (every layer and head asked for), "head"
    (one layer, those heads) or "map" (one layer and head); as PNG, and as SVG when asked."""

    view: ModelView
    layer: int | None
    heads: list[int]
    png: bytes
    svg: bytes | None


def picture_count(views: Sequence[str], layers: int, heads: int) -> int:
    """How many pictures `render_pictures` draws (checked against the limits beforehand)."""
    per_view = {"model": 1, "head": layers, "map": layers * heads}
    return sum(per_view[v] for v in views)


def render_pictures(
    attentions: np.ndarray,
    tokens: Sequence[str],
    *,
    layers: Sequence[int],
    heads: Sequence[int],
    views: Sequence[ModelView],
    title: str,
    svg: bool,
) -> list[ModelPicture]:
    """attentions (len(layers), len(heads), L, L): the model view, then per layer its head view
    and each head's map, as `views` asks; PNG always, the same figure as SVG when `svg`."""
    head_ids = list(heads)
    out: list[ModelPicture] = []

    def add(view: ModelView, layer: int | None, shown: list[int], draw: Any) -> None:
        checkpoint()  # an abandoned request stops between pictures
        out.append(ModelPicture(view, layer, shown, draw("png"), draw("svg") if svg else None))

    if "model" in views:
        add(
            "model",
            None,
            head_ids,
            lambda fmt: model_view(attentions, layers=layers, heads=heads, title=title, fmt=fmt),
        )
    for i, layer in enumerate(layers):
        if "head" in views:
            add(
                "head",
                layer,
                head_ids,
                lambda fmt, i=i, layer=layer: head_view(
                    attentions[i], tokens, layer=layer, heads=heads, title=title, fmt=fmt
                ),
            )
        if "map" in views:
            for k, head in enumerate(head_ids):
                add(
                    "map",
                    layer,
                    [head],
                    lambda fmt, i=i, k=k, layer=layer, head=head: head_map(
                        attentions[i, k],
                        tokens,
                        title=f"{title}, layer {layer}, head {head}",
                        fmt=fmt,
                    ),
                )
    return out
