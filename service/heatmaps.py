"""PNG heatmaps of attention weights: matplotlib's Agg canvas through the object API, never pyplot.

Speed (a 512x512 map with its colorbar must take well under 60 ms):
- Each worker thread keeps its own figures (thread-local, nothing shared between threads) and
  only swaps data, limits, labels and titles per image; titles and axis labels are figure texts
  at fixed places, so no layout pass runs.
- A figure is drawn in two layers. The frame (axes, ticks, tick and axis labels) is drawn once
  and kept as a pixel copy while the shape and labels stay the same, as for every head of one
  request; per image only the colorbar, the title and the map itself are drawn over that copy.
  Most of a matplotlib draw is text, and most text is in the frame.
- The map is coloured by the colormap's lookup table in numpy, sampled nearest-neighbour to the
  axes' pixels (what imshow's interpolation="nearest" shows) and written into the canvas, instead
  of going through imshow's resampling; the spines are then drawn over it as imshow would have.
- PNG: zlib level 1 (half the time of the default level 6, for ~25 % more bytes); most of the
  rest of the encoding is Pillow's per-row filter choice, which it does not let us turn off.
"""

from __future__ import annotations

import base64
import io
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from service.cancel import checkpoint
from service.errors import InputError
from service.limits import Limits
from service.schemas import HeatmapSpec
from service.store import HeatmapStore

HeadKey = int | Literal["mean", "all"]

_DPI = 100
_MAX_TICK_LABELS = 40  # more token labels than this are thinned to every n-th
_NUMERIC_TICKS = 6
_LABEL_CHARS = 12
_PNG_COMPRESS = 1  # zlib level 1: see the module's docstring


@dataclass(frozen=True)
class RenderedImage:
    """One PNG and what it shows: head is an index, "mean" (head average) or "all" (grid)."""

    batch: int
    head: HeadKey
    png: bytes


def _png(canvas: FigureCanvasAgg) -> bytes:
    width, height = canvas.get_width_height()
    # RGB instead of RGBA: the background is opaque anyway, and a quarter fewer bytes to deflate.
    rgba = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    out = io.BytesIO()
    rgba.convert("RGB").save(out, format="png", compress_level=_PNG_COMPRESS)
    return out.getvalue()


def _short(label: str) -> str:
    """A tick label safe to draw: printable, lone surrogates replaced, at most a few chars."""
    text = label.encode("utf-8", "replace").decode("utf-8")
    text = "".join(ch if ch.isprintable() else "\N{REPLACEMENT CHARACTER}" for ch in text)
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"


def _ticks(n: int, labels: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Tick positions and texts: every label (thinned when many), else a few indices."""
    if labels is not None:
        step = max(1, math.ceil(n / _MAX_TICK_LABELS))
        pos = np.arange(0, n, step)
        return pos, [_short(labels[i]) for i in pos]
    pos = np.unique(np.linspace(0, n - 1, min(n, _NUMERIC_TICKS)).round().astype(int))
    return pos, [str(i) for i in pos]


def _color_limits(matrix: np.ndarray, diverging: bool) -> tuple[float, float]:
    finite = matrix[np.isfinite(matrix)]
    if finite.size == 0:
        return (-1.0, 1.0) if diverging else (0.0, 1.0)
    if diverging:
        bound = float(np.abs(finite).max()) or 1.0
        return -bound, bound
    # Probabilities: start at 0 so that the colours mean the same thing in every image.
    top = float(finite.max())
    return 0.0, top if top > 0 else 1.0


def _paint(canvas: FigureCanvasAgg, ax: Axes, matrix: np.ndarray, colors: ScalarMappable) -> None:
    """Draw `matrix` (row 0 at the top) filling `ax`, then its spines, into the canvas pixels.

    Each pixel shows the cell under its centre (imshow's "nearest"); NaN shows the axes' white.
    """
    box = ax.get_window_extent()
    height = canvas.get_width_height()[1]
    x0, x1 = round(box.x0), round(box.x1)
    top, bottom = height - round(box.y1), height - round(box.y0)  # buffer rows count downwards
    rows, cols = matrix.shape
    if rows and cols and x1 > x0 and bottom > top:
        r = ((np.arange(bottom - top) + 0.5) * (rows / (bottom - top))).astype(np.intp)
        c = ((np.arange(x1 - x0) + 0.5) * (cols / (x1 - x0))).astype(np.intp)
        # Normalised by hand: Normalize's masked arrays cost more than the colouring itself.
        vmin, vmax = colors.get_clim()
        scaled = (matrix[r[:, None], c[None, :]] - vmin) * (1.0 / (vmax - vmin))
        rgba = colors.get_cmap()(scaled, bytes=True)
        rgba[rgba[..., 3] == 0] = 255  # the colormap's "bad" colour is transparent
        pixels = np.asarray(canvas.buffer_rgba())
        pixels[top:bottom, x0:x1, :3] = rgba[..., :3]
    renderer = canvas.get_renderer()
    for spine in ax.spines.values():
        spine.draw(renderer)


def _no_axis_labels(*axes: Axes) -> None:
    """Axis labels are figure texts here: fixing the (empty) axis labels' places spares every
    draw the search for a free spot beside the tick labels (a fifth of a colorbar's draw)."""
    for ax in axes:
        ax.xaxis.set_label_coords(0.5, 0.0)
        ax.yaxis.set_label_coords(0.0, 0.5)


class _Layered:
    """A figure drawn as a cached frame plus per-image artists (colorbar, title, maps).

    Subclasses create the figure; artists set animated are left out of the frame and drawn
    per image with `_draw_over`.
    """

    def __init__(self, fig: Figure) -> None:
        self.fig = fig
        self.canvas = FigureCanvasAgg(fig)
        self._frame_key: object = None
        self._frame: object = None

    def _frame_for(self, key: object) -> None:
        """Put the frame for `key` on the canvas: from the pixel copy if it is the last one."""
        if key == self._frame_key:
            self.canvas.restore_region(self._frame)
            return
        self._frame_key = None  # until the new frame is complete
        self.canvas.draw()  # animated artists are left out
        self._frame = self.canvas.copy_from_bbox(self.fig.bbox)
        self._frame_key = key

    def _draw_over(self, *artists: Artist) -> None:
        renderer = self.canvas.get_renderer()
        for artist in artists:
            artist.draw(renderer)


class _MapCanvas(_Layered):
    """A figure with one heatmap and its colorbar, re-used for every image of one thread."""

    def __init__(self) -> None:
        super().__init__(Figure(figsize=(6.4, 5.4), dpi=_DPI))
        self.ax = self.fig.add_axes((0.12, 0.1, 0.71, 0.81))
        self.cax = self.fig.add_axes((0.86, 0.1, 0.03, 0.81))
        self.colors = ScalarMappable(Normalize(0.0, 1.0), "viridis")
        self.colorbar = self.fig.colorbar(self.colors, cax=self.cax)
        self.title = self.fig.text(0.475, 0.975, "", ha="center", va="top", fontsize=11)
        self.xlabel = self.fig.text(0.475, 0.008, "", ha="center", va="bottom")
        self.ylabel = self.fig.text(0.008, 0.5, "", rotation=90, ha="left", va="center")
        self.cax.set_animated(True)
        self.title.set_animated(True)
        _no_axis_labels(self.ax, self.cax)
        self.cax.xaxis.set_visible(False)  # a vertical colorbar's short side has no ticks

    def render(
        self,
        matrix: np.ndarray,
        *,
        title: str,
        xlabel: str,
        ylabel: str,
        xlabels: Sequence[str] | None,
        ylabels: Sequence[str] | None,
        diverging: bool,
    ) -> bytes:
        rows, cols = matrix.shape
        xpos, xtext = _ticks(cols, xlabels)
        ypos, ytext = _ticks(rows, ylabels)
        key = (rows, cols, tuple(xtext), tuple(ytext), xlabels is None, ylabels is None)
        key += (xlabel, ylabel)
        # Wider margins when token labels need room.
        left = 0.2 if ylabels is not None else 0.12
        bottom = 0.2 if xlabels is not None else 0.1
        if key != self._frame_key:
            self.ax.set_position((left, bottom, 0.83 - left, 0.91 - bottom))
            self.cax.set_position((0.86, bottom, 0.03, 0.91 - bottom))
            # An empty side still gets a one-cell frame (equal limits would be singular).
            self.ax.set_xlim(-0.5, max(cols, 1) - 0.5)
            self.ax.set_ylim(max(rows, 1) - 0.5, -0.5)
            # parse_math=False: a token such as "$x" is text, not a (broken) TeX formula.
            self.ax.set_xticks(
                xpos,
                xtext,
                rotation=90 if xlabels is not None else 0,
                fontsize=8 if xlabels else 10,
                parse_math=False,
            )
            self.ax.set_yticks(ypos, ytext, fontsize=8 if ylabels else 10, parse_math=False)
            self.xlabel.set_text(xlabel)
            self.ylabel.set_text(ylabel)
        self._frame_for(key)
        cmap = "RdBu_r" if diverging else "viridis"
        if self.colors.get_cmap().name != cmap:  # each change redraws the whole colorbar
            self.colors.set_cmap(cmap)
        self.colors.set_clim(*_color_limits(matrix, diverging))
        self.title.set_text(title)
        _paint(self.canvas, self.ax, matrix, self.colors)
        self._draw_over(self.cax, self.title)
        return _png(self.canvas)


_local = threading.local()


def render_map(
    matrix: np.ndarray,
    *,
    title: str,
    xlabel: str = "key",
    ylabel: str = "query",
    xlabels: Sequence[str] | None = None,
    ylabels: Sequence[str] | None = None,
    diverging: bool = False,
) -> bytes:
    """A PNG of one 2-D matrix with a colorbar (diverging colours for signed data)."""
    canvas: _MapCanvas | None = getattr(_local, "canvas", None)
    if canvas is None:
        canvas = _local.canvas = _MapCanvas()
    try:
        return canvas.render(
            np.asarray(matrix, dtype=np.float32),
            title=title,
            xlabel=xlabel,
            ylabel=ylabel,
            xlabels=xlabels,
            ylabels=ylabels,
            diverging=diverging,
        )
    except BaseException:
        _local.canvas = None  # never reuse a figure left half-updated
        raise


class _GridCanvas(_Layered):
    """Panels on a grid (no ticks) sharing one colorbar; one per thread and panel count."""

    def __init__(self, n: int) -> None:
        ncols = math.ceil(math.sqrt(n))
        nrows = math.ceil(n / ncols)
        panel = 2.2 if ncols <= 4 else 1.6
        super().__init__(Figure(figsize=(panel * ncols + 1.2, panel * nrows + 0.8), dpi=_DPI))
        grid = self.fig.add_gridspec(nrows, ncols, left=0.06, right=0.86, bottom=0.06, top=0.9)
        self.panels = [self.fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(n)]
        for ax in self.panels:
            ax.set_xticks([])
            ax.set_yticks([])
        self.colors = ScalarMappable(Normalize(0.0, 1.0), "viridis")
        self.cax = self.fig.add_axes((0.89, 0.06, 0.025, 0.84))
        self.colorbar = self.fig.colorbar(self.colors, cax=self.cax)
        self.title = self.fig.text(0.46, 0.985, "", ha="center", va="top", fontsize=11)
        self.fig.text(0.46, 0.005, "key", ha="center", va="bottom")
        self.fig.text(0.005, 0.48, "query", rotation=90, ha="left", va="center")
        self.cax.set_animated(True)
        self.title.set_animated(True)
        _no_axis_labels(self.cax, *self.panels)
        self.cax.xaxis.set_visible(False)

    def render(self, maps: np.ndarray, panel_titles: Sequence[str], title: str) -> bytes:
        key = tuple(panel_titles)
        if key != self._frame_key:
            for ax, text in zip(self.panels, panel_titles, strict=True):
                ax.set_title(text, fontsize=9, pad=2)
        self._frame_for(key)
        self.colors.set_clim(*_color_limits(maps, diverging=False))
        self.title.set_text(title)
        for ax, matrix in zip(self.panels, maps, strict=True):
            _paint(self.canvas, ax, matrix, self.colors)
        self._draw_over(self.cax, self.title)
        return _png(self.canvas)


_GRIDS_KEPT = 4  # grid figures kept per thread (one per panel count), least recently used out


def render_grid(maps: np.ndarray, panel_titles: Sequence[str], *, title: str) -> bytes:
    """One PNG with every map of `maps` (N, rows, cols) on a grid, sharing one colorbar."""
    grids: dict[int, _GridCanvas] = _local.__dict__.setdefault("grids", {})
    n = maps.shape[0]
    canvas = grids.pop(n, None) or _GridCanvas(n)
    # If rendering fails the figure is not put back: never reuse one left half-updated.
    png = canvas.render(np.asarray(maps, dtype=np.float32), panel_titles, title)
    grids[n] = canvas  # most recently used last
    while len(grids) > _GRIDS_KEPT:
        del grids[next(iter(grids))]
    return png


def plan_heads(num_heads: int, heads: Sequence[int] | str) -> tuple[list[int], bool, bool]:
    """(heads drawn one by one, whether a head-mean image is drawn, whether a grid is drawn).

    "all": every head, plus the mean and a grid when there are several; "mean": the head mean
    only; a list: those heads, plus a grid when there are several.
    """
    if heads == "mean":
        return [], True, False
    if heads == "all":
        return list(range(num_heads)), num_heads > 1, num_heads > 1
    chosen = list(dict.fromkeys(heads))
    return chosen, False, len(chosen) > 1


def image_count(num_heads: int, heads: Sequence[int] | str) -> int:
    chosen, mean, grid = plan_heads(num_heads, heads)
    return len(chosen) + mean + grid


def render_weights(
    weights: np.ndarray,
    *,
    batch: int,
    heads: Sequence[int] | str,
    tokens: Sequence[str] | None,
    title: str,
) -> list[RenderedImage]:
    """Images of weights (B, H, Lq, Lk) for one batch item, as `plan_heads` describes."""
    per_head = weights[batch]
    num_heads, lq, lk = per_head.shape
    chosen, mean, grid = plan_heads(num_heads, heads)
    xlabels = tokens
    ylabels = tokens if tokens is not None and lq == lk else None
    images: list[RenderedImage] = []

    def one(matrix: np.ndarray, head: HeadKey, what: str) -> None:
        checkpoint()  # an abandoned HTTP job stops between images
        png = render_map(
            matrix, title=f"{title}, batch {batch}, {what}", xlabels=xlabels, ylabels=ylabels
        )
        images.append(RenderedImage(batch, head, png))

    for h in chosen:
        one(per_head[h], h, f"head {h}")
    if mean:
        one(per_head.mean(axis=0), "mean", "mean of heads")
    if grid:
        checkpoint()
        png = render_grid(
            per_head[chosen], [f"head {h}" for h in chosen], title=f"{title}, batch {batch}"
        )
        images.append(RenderedImage(batch, "all", png))
    return images


def check_spec(spec: HeatmapSpec, shape: tuple[int, int, int, int], limits: Limits) -> None:
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


def image_url(image_id: str) -> str:
    return f"/v1/heatmaps/{image_id}.png"


def publish(images: list[RenderedImage], store: HeatmapStore, inline: bool) -> list[dict]:
    """Response entries: {"id", "url", "batch", "head"} after storing, or {"png": base64} inline."""
    if inline:
        return [
            {"batch": im.batch, "head": im.head, "png": base64.b64encode(im.png).decode("ascii")}
            for im in images
        ]
    ids = store.put_many([im.png for im in images])
    return [
        {"id": i, "url": image_url(i), "batch": im.batch, "head": im.head}
        for i, im in zip(ids, images, strict=True)
    ]


def publish_one(png: bytes, store: HeatmapStore, inline: bool) -> dict:
    """{"id", "url"} of a stored image, or {"png": base64} inline."""
    if inline:
        return {"png": base64.b64encode(png).decode("ascii")}
    image_id = store.put(png)
    return {"id": image_id, "url": image_url(image_id)}


def draw(weights: np.ndarray, spec: HeatmapSpec, store: HeatmapStore, *, title: str) -> list[dict]:
    """Render the maps `spec` asks for from weights (B, H, Lq, Lk) and publish them."""
    images = render_weights(
        weights, batch=spec.batch, heads=spec.heads, tokens=spec.tokens, title=title
    )
    return publish(images, store, spec.inline)
