"""HTTP view of `"compare": true` (service/approx.py): its JSON fields and its heatmaps.

Each drawn head is one PNG of three panels: the exact map, the approximation's implied map
and their difference (approximation - exact, diverging colours around 0). Maps are bin means,
pooled to at most approx.MAP_SIDE a side, so a long sequence is drawn rather than refused; the
title says when a map is pooled.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from service import approx, heatmaps, wire
from service.errors import InputError
from service.limits import Limits
from service.schemas import HeatmapSpec
from service.store import HeatmapStore
from service.tensors import Encoding

_MAP_FIELDS = ("rel_error_per_head", "implied_map", "exact_map")
_PANEL = 0.325  # width of one panel with its colorbar and labels, as a fraction of the figure


def to_json(comparison: dict[str, Any], encoding: Encoding) -> dict[str, Any]:
    """The comparison for a response body; arrays in the response's encoding."""
    return {
        key: wire.encode(np.asarray(val), encoding)
        if key in _MAP_FIELDS and val is not None
        else val
        for key, val in comparison.items()
    }


def check_spec(spec: HeatmapSpec, shape: tuple[int, int, int, int], limits: Limits) -> None:
    """Refuse what cannot be drawn for attention of shape (B, H, Lq, Lk), before computing."""
    b, h, lq, lk = shape
    pq, pk = min(lq, approx.MAP_SIDE), min(lk, approx.MAP_SIDE)
    if spec.tokens is not None and pk != lk:
        raise InputError(
            ("heatmap", "tokens"),
            f"the compared maps are pooled to {pk} key bins for {lk} keys; token labels only "
            f"apply up to {approx.MAP_SIDE} keys",
        )
    heatmaps.check_spec(spec, (b, h, pq, pk), limits)


def _as_4d(a: np.ndarray) -> np.ndarray:
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


class _Canvas:
    """Three heatmaps with their colorbars at fixed places, re-used for every image of a thread
    (building a figure costs far more than swapping its data)."""

    def __init__(self) -> None:
        self.fig = Figure(figsize=(15.6, 4.8), dpi=100)
        self.canvas = FigureCanvasAgg(self.fig)
        self.axes, self.images = [], []
        for i in range(3):
            left = 0.04 + i * _PANEL
            ax = self.fig.add_axes((left, 0.1, 0.22, 0.68))
            image = ax.imshow(np.zeros((2, 2), np.float32), interpolation="nearest", aspect="auto")
            self.fig.colorbar(image, cax=self.fig.add_axes((left + 0.228, 0.1, 0.01, 0.68)))
            ax.set_xlabel("key")
            ax.set_ylabel("query")
            self.axes.append(ax)
            self.images.append(image)
        self.title = self.fig.text(0.5, 0.975, "", ha="center", va="top", fontsize=11)

    def render(self, panels: list[tuple[str, np.ndarray, dict[str, Any]]], title: str) -> bytes:
        for i, (ax, image) in enumerate(zip(self.axes, self.images, strict=True)):
            shown = i < len(panels)
            ax.set_visible(shown)
            image.colorbar.ax.set_visible(shown)
            if not shown:
                continue
            name, matrix, style = panels[i]
            rows, cols = matrix.shape
            image.set_data(matrix)
            image.set_cmap(style["cmap"])
            image.set_clim(style["vmin"], style["vmax"])
            image.set_extent((-0.5, cols - 0.5, rows - 0.5, -0.5))
            ax.set_xlim(-0.5, cols - 0.5)
            ax.set_ylim(rows - 0.5, -0.5)
            ax.set_title(name, fontsize=10)
        self.title.set_text(title)
        self.title.set_x(0.5 if len(panels) > 1 else _PANEL / 2)  # over the panel when alone
        self.canvas.draw()
        width, height = self.canvas.get_width_height()
        rgba = Image.frombuffer("RGBA", (width, height), self.canvas.buffer_rgba(), "raw")
        if len(panels) == 1:  # the approximation alone: crop to its panel
            rgba = rgba.crop((0, 0, int(width * _PANEL), height))
        out = io.BytesIO()
        rgba.convert("RGB").save(out, format="png", compress_level=1)  # fast, a few % larger
        return out.getvalue()


_local = threading.local()


def _render(exact: np.ndarray | None, implied: np.ndarray, *, title: str) -> bytes:
    """exact | implied | implied - exact, side by side (implied alone when exact is None)."""
    signed = bool((implied < 0).any())  # linformer's implied operator is signed
    top = max(float(np.nanmax(np.abs(implied))), 0.0 if exact is None else float(exact.max()))
    top = top or 1.0
    prob = (
        {"cmap": "RdBu_r", "vmin": -top, "vmax": top}
        if signed
        else {"cmap": "viridis", "vmin": 0.0, "vmax": top}
    )
    panels = [("approximation (implied)", implied, prob)]
    if exact is not None:
        diff = implied - exact
        bound = float(np.nanmax(np.abs(diff))) or 1.0
        panels = [
            ("exact", exact, prob),
            panels[0],
            ("approximation - exact", diff, {"cmap": "RdBu_r", "vmin": -bound, "vmax": bound}),
        ]
    canvas: _Canvas | None = getattr(_local, "canvas", None)
    if canvas is None:
        canvas = _local.canvas = _Canvas()
    return canvas.render(panels, title)


def draw(comparison: dict[str, Any], spec: HeatmapSpec, store: HeatmapStore) -> list[dict]:
    """Render the heads `spec` asks for (a head list, or "all"/"mean") and publish them."""
    implied = _as_4d(np.asarray(comparison["implied_map"]))[spec.batch]
    exact_all = comparison["exact_map"]
    exact = None if exact_all is None else _as_4d(np.asarray(exact_all))[spec.batch]
    per_head = _as_4d(np.asarray(comparison["rel_error_per_head"])[..., None, None])[spec.batch]
    chosen, mean, _ = heatmaps.plan_heads(implied.shape[0], spec.heads)
    pooled = comparison["pooled"]
    notes = (
        [f"pooled to {implied.shape[1]}x{implied.shape[2]} bins of mean weight"] if pooled else []
    )
    if exact is None:
        notes.append("exact map not computed at this size")
    images = []
    for head in [*chosen, *(["mean"] if mean else [])]:
        if head == "mean":
            imp, ex, err = implied.mean(0), None if exact is None else exact.mean(0), None
        else:
            imp, ex = implied[head], None if exact is None else exact[head]
            err = float(per_head[head, 0, 0])
        what = "mean of heads" if head == "mean" else f"head {head}"
        error = f", rel. error {err:.3g}" if err is not None else ""
        title = f"{comparison['method']} vs exact, batch {spec.batch}, {what}{error}"
        title += "".join(f"\n{n}" for n in notes)
        png = _render(ex, imp, title=title)
        images.append(heatmaps.RenderedImage(spec.batch, head, png))
    return heatmaps.publish(images, store, spec.inline)
