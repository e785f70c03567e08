"""Every PNG the service draws: matplotlib's Agg canvas through the object API, never pyplot.

Three figures, each kept per worker thread and re-used: one map with its colorbar
(`render_map`: attention maps, positional encodings), panels on a grid sharing a colorbar
(`render_grid`: the heads of one request), and up to three maps side by side (`render_panels`:
exact | approximation | difference of a comparison). What the pictures show (titles, labels,
scales) is decided in service.render.views.

Speed (a 512x512 map with its colorbar must take well under 60 ms):
- Each worker thread keeps its own figures (thread-local, nothing shared between threads) and
  only swaps data, limits, labels and titles per image; titles and axis labels are figure texts
  at fixed places, so no layout pass runs.
- A figure is drawn in two layers. The frame (axes, ticks, tick and axis labels) is drawn once
  per shape and labels and kept as a pixel copy (the last few of them, so that a request's
  head maps and its positional encoding do not redraw each other's), as for every head of one
  request; per image only the colorbar's ticks and labels, the title and the map itself are
  drawn over that copy (the colorbar's colour strip looks the same whatever the limits, so it is
  part of the frame). Most of a matplotlib draw is text, and most text is in the frame.
- The map is coloured by the colormap's lookup table in numpy, sampled nearest-neighbour to the
  axes' pixels (what imshow's interpolation="nearest" shows) and written into the canvas, instead
  of going through imshow's resampling; the spines are then drawn over it as imshow would have.
- PNG: zlib level 1 (half the time of the default level 6, for ~25 % more bytes); most of the
  rest of the encoding is Pillow's per-row filter choice, which it does not let us turn off.

Over 400 lines on purpose: the three figures share the layering, the colorbar, the painting and
the PNG encoding above; a module per figure would import all of it from a fourth.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Concatenate, NamedTuple, ParamSpec, TypeVar

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.transforms import blended_transform_factory
from PIL import Image

try:  # what Colorbar itself calls (matplotlib >= 3.11; the public name is deprecated there)
    from matplotlib.transforms import _nonsingular as nonsingular
except ImportError:  # pragma: no cover - older matplotlib
    from matplotlib.transforms import nonsingular

_DPI = 100
_MAX_TICK_LABELS = 40  # more token labels than this are thinned to every n-th
_NUMERIC_TICKS = 6
_LABEL_CHARS = 12
_PNG_COMPRESS = 1  # zlib level 1: see the module's docstring
_FRAMES_KEPT = 4  # frames (pixel copies, 1.4 MB each for a map) kept per figure


def _png(canvas: FigureCanvasAgg, crop_width: int | None = None) -> bytes:
    width, height = canvas.get_width_height()
    # RGB instead of RGBA: the background is opaque anyway, and a quarter fewer bytes to deflate.
    rgba = Image.frombuffer("RGBA", (width, height), canvas.buffer_rgba(), "raw", "RGBA", 0, 1)
    if crop_width is not None:
        rgba = rgba.crop((0, 0, crop_width, height))
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
        return pos, [_short(labels[int(i)]) for i in pos]
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


# Consecutive ranges of the key axis, (label, width) each: a map of keys [A | B | C] is drawn
# with a separator between the ranges and each range's label above it.
Sections = Sequence[tuple[str, int]]


def _separators(ax: Axes, sections: Sections | None) -> list[Artist]:
    """White lines between the non-empty sections, drawn over each image (not in the frame)."""
    if not sections:
        return []
    edges, start = [], 0
    for _, width in sections:
        if width > 0 and start > 0:
            edges.append(start)
        start += width
    return [ax.axvline(x - 0.5, color="white", linewidth=1.5, animated=True) for x in edges]


def _section_labels(
    ax: Axes, sections: Sections | None, cols: int, figure_px: float
) -> list[Artist]:
    """Each non-empty section's label and width above the axes, centred on it; a label that
    would run into its left neighbour goes one row up."""
    if not sections:
        return []
    trans = blended_transform_factory(ax.transData, ax.transAxes)
    axes_px = ax.get_position().width * figure_px
    row_ends = [-math.inf, -math.inf]
    labels: list[Artist] = []
    start = 0
    for label, width in sections:
        if width > 0:
            text = f"{label} ({width})"
            centre = (start + width / 2) / max(cols, 1) * axes_px
            half = 2.6 * len(text)  # ~5 px per character at 8 pt
            row = next((r for r, end in enumerate(row_ends) if centre - half > end + 4), 1)
            row_ends[row] = centre + half
            labels.append(
                ax.text(
                    start + width / 2 - 0.5, 1.01 + 0.045 * row, text, transform=trans,
                    ha="center", va="bottom", fontsize=8, clip_on=False,
                )
            )  # fmt: skip
        start += width
    return labels


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
        # The key whose labels, ticks and positions the figure's artists hold now.
        self._frame_key: object = None
        # Pixel copies of the last few frames: a request alternates between two (every head's
        # map, then the positional encoding), and drawing one again costs 40-50 ms.
        self._frames: OrderedDict[object, object] = OrderedDict()

    def _frame_for(self, key: object) -> None:
        """Put the frame for `key` on the canvas, from its pixel copy when one is kept. The
        caller has set the artists for `key` (and made it `_frame_key`) first."""
        frame = self._frames.get(key)
        if frame is None:
            self._frame_key = None  # until the new frame is complete
            self.canvas.draw()  # animated artists are left out
            frame = self.canvas.copy_from_bbox(self.fig.bbox)
            self._frames[key] = frame
            while len(self._frames) > _FRAMES_KEPT:
                self._frames.popitem(last=False)
        else:
            self._frames.move_to_end(key)
            self.canvas.restore_region(frame)
        self._frame_key = key

    def _draw_over(self, *artists: Artist) -> None:
        renderer = self.canvas.get_renderer()
        for artist in artists:
            artist.draw(renderer)


class _Colorbar:
    """A colorbar whose colour strip and outline belong to the cached frame: per image only its
    ticks and tick labels are drawn. The strip looks the same whatever the limits (the colour map
    from bottom to top), so rebuilding its mesh at every change of limits and drawing it again
    took a third of an image's time for nothing.

    `colors` colours the maps; the colorbar shows its own mappable, fixed at 0..1, whose mesh
    the frame draws while the long axis spans 0..1 (`frame_limits`). Per image `set_clim` sets
    both the painting limits and the long axis as matplotlib's Colorbar would (the limits made
    non-singular, then the norm's inverse of 0 and 1), so the ticks and labels are the ones it
    would draw."""

    def __init__(self, fig: Figure, cax: Axes, cmap: str = "viridis") -> None:
        self.colors = ScalarMappable(Normalize(0.0, 1.0), cmap)
        self._strip = ScalarMappable(Normalize(0.0, 1.0), cmap)
        self.colorbar = fig.colorbar(self._strip, cax=cax)
        self.cax = cax
        cax.yaxis.set_animated(True)
        cax.xaxis.set_visible(False)  # a vertical colorbar's short side has no ticks

    def frame_limits(self, cmap: str) -> None:
        """Before a frame is drawn: the strip in `cmap`, its long axis over the mesh's 0..1."""
        if self._strip.get_cmap().name != cmap:
            self._strip.set_cmap(cmap)  # the colorbar rebuilds its mesh in the new colours
            self.colors.set_cmap(cmap)
        self.cax.set_ylim(0.0, 1.0)

    def set_clim(self, vmin: float, vmax: float) -> None:
        lo, hi = nonsingular(vmin, vmax, expander=0.1)  # as Colorbar._process_values
        self.colors.set_clim(lo, hi)
        ends = Normalize(lo, hi).inverse(np.array([0.0, 1.0]))
        self.cax.set_ylim(float(ends[0]), float(ends[1]))

    def ticks(self) -> Artist:
        """The per-image part: the long axis (ticks, labels, offset text)."""
        return self.cax.yaxis


class _MapCanvas(_Layered):
    """A figure with one heatmap and its colorbar, re-used for every image of one thread."""

    def __init__(self) -> None:
        super().__init__(Figure(figsize=(6.4, 5.4), dpi=_DPI))
        self.ax = self.fig.add_axes((0.12, 0.1, 0.71, 0.81))
        self.cax = self.fig.add_axes((0.86, 0.1, 0.03, 0.81))
        self.bar = _Colorbar(self.fig, self.cax)
        self.title = self.fig.text(0.475, 0.975, "", ha="center", va="top", fontsize=11)
        self.xlabel = self.fig.text(0.475, 0.008, "", ha="center", va="bottom")
        self.ylabel = self.fig.text(0.008, 0.5, "", rotation=90, ha="left", va="center")
        self.title.set_animated(True)
        _no_axis_labels(self.ax, self.cax)
        self.separators: list[Artist] = []
        self.section_labels: list[Artist] = []

    def render(
        self,
        matrix: np.ndarray,
        *,
        title: str,
        xlabel: str = "key",
        ylabel: str = "query",
        xlabels: Sequence[str] | None = None,
        ylabels: Sequence[str] | None = None,
        diverging: bool = False,
        sections: Sections | None = None,
    ) -> bytes:
        """A PNG of one 2-D matrix with a colorbar (diverging colours for signed data);
        `sections` (label, width) cut the key axis into labelled ranges with separators."""
        matrix = np.asarray(matrix, dtype=np.float32)
        rows, cols = matrix.shape
        xpos, xtext = _ticks(cols, xlabels)
        ypos, ytext = _ticks(rows, ylabels)
        cmap = "RdBu_r" if diverging else "viridis"
        key: tuple[object, ...] = (rows, cols, tuple(xtext), tuple(ytext))
        key += (xlabels is None, ylabels is None, xlabel, ylabel, cmap, tuple(sections or ()))
        # Wider margins when token labels need room; a lower top when sections are labelled.
        left = 0.2 if ylabels is not None else 0.12
        bottom = 0.2 if xlabels is not None else 0.1
        top = 0.83 if sections else 0.91
        if key != self._frame_key:
            self.ax.set_position((left, bottom, 0.83 - left, top - bottom))
            self.cax.set_position((0.86, bottom, 0.03, top - bottom))
            for artist in self.separators + self.section_labels:
                artist.remove()
            self.separators = _separators(self.ax, sections)
            width_px = self.fig.get_figwidth() * _DPI
            self.section_labels = _section_labels(self.ax, sections, cols, width_px)
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
            self.bar.frame_limits(cmap)
        self._frame_for(key)
        self.bar.set_clim(*_color_limits(matrix, diverging))
        self.title.set_text(title)
        _paint(self.canvas, self.ax, matrix, self.bar.colors)
        self._draw_over(*self.separators, self.bar.ticks(), self.title)
        return _png(self.canvas)


C = TypeVar("C")
P = ParamSpec("P")


def _per_thread(
    make: Callable[[], C], draw: Callable[Concatenate[C, P], bytes]
) -> Callable[P, bytes]:
    """`draw` on this thread's own canvas, made by `make` on first use (building a figure
    costs far more than redrawing one). A canvas whose drawing raised is dropped: a figure
    left half-updated is never reused."""
    local = threading.local()

    def render(*args: P.args, **kwargs: P.kwargs) -> bytes:
        canvas = local.__dict__.pop("canvas", None) or make()
        png = draw(canvas, *args, **kwargs)
        local.canvas = canvas
        return png

    render.__doc__ = draw.__doc__
    return render


render_map = _per_thread(_MapCanvas, _MapCanvas.render)


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
        self.cax = self.fig.add_axes((0.89, 0.06, 0.025, 0.84))
        self.bar = _Colorbar(self.fig, self.cax)
        self.title = self.fig.text(0.46, 0.985, "", ha="center", va="top", fontsize=11)
        self.fig.text(0.46, 0.005, "key", ha="center", va="bottom")
        self.fig.text(0.005, 0.48, "query", rotation=90, ha="left", va="center")
        self.title.set_animated(True)
        _no_axis_labels(self.cax, *self.panels)
        self.separators: list[Artist] = []

    def render(
        self,
        maps: np.ndarray,
        panel_titles: Sequence[str],
        title: str,
        sections: Sections | None = None,
    ) -> bytes:
        key = (tuple(panel_titles), maps.shape[1:], tuple(sections or ()))
        if key != self._frame_key:
            for ax, text in zip(self.panels, panel_titles, strict=True):
                ax.set_title(text, fontsize=9, pad=2)
                ax.set_xlim(-0.5, max(maps.shape[2], 1) - 0.5)  # data units for the separators
            for artist in self.separators:
                artist.remove()
            self.separators = [line for ax in self.panels for line in _separators(ax, sections)]
            self.bar.frame_limits("viridis")
        self._frame_for(key)
        self.bar.set_clim(*_color_limits(maps, diverging=False))
        self.title.set_text(title)
        for ax, matrix in zip(self.panels, maps, strict=True):
            _paint(self.canvas, ax, matrix, self.bar.colors)
        self._draw_over(*self.separators, self.bar.ticks(), self.title)
        return _png(self.canvas)


_GRIDS_KEPT = 4  # grid figures kept per thread (one per panel count), least recently used out
_grids = threading.local()


def render_grid(
    maps: np.ndarray, panel_titles: Sequence[str], *, title: str, sections: Sections | None = None
) -> bytes:
    """One PNG with every map of `maps` (N, rows, cols) on a grid, sharing one colorbar;
    `sections` as for render_map (separators only: the panels are too small for labels)."""
    grids: dict[int, _GridCanvas] = _grids.__dict__.setdefault("grids", {})
    n = maps.shape[0]
    canvas = grids.pop(n, None) or _GridCanvas(n)
    # If rendering fails the figure is not put back: never reuse one left half-updated.
    png = canvas.render(np.asarray(maps, dtype=np.float32), panel_titles, title, sections)
    grids[n] = canvas  # most recently used last
    while len(grids) > _GRIDS_KEPT:
        del grids[next(iter(grids))]
    return png


_PANEL = 0.325  # width of one panel of render_panels, with its colorbar and labels (figure = 1)


class Panel(NamedTuple):
    """One map of `render_panels`, with its colormap and colour limits."""

    title: str
    matrix: np.ndarray
    cmap: str
    vmin: float
    vmax: float


class _PanelsCanvas:
    """Three heatmaps with their colorbars at fixed places, re-used for every image of a thread
    (building a figure costs far more than swapping its data)."""

    def __init__(self) -> None:
        self.fig = Figure(figsize=(15.6, 4.8), dpi=_DPI)
        self.canvas = FigureCanvasAgg(self.fig)
        self.axes: list[Axes] = []
        self.images: list[AxesImage] = []
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

    def render(self, panels: Sequence[Panel], *, title: str) -> bytes:
        """One PNG of up to three maps side by side, each with its own colorbar."""
        for i, (ax, image) in enumerate(zip(self.axes, self.images, strict=True)):
            shown = i < len(panels)
            ax.set_visible(shown)
            image.colorbar.ax.set_visible(shown)  # type: ignore[union-attr]
            if not shown:
                continue
            panel = panels[i]
            # An empty map (no queries or no keys) keeps one cell of room: zero-width limits
            # are singular.
            rows, cols = (max(n, 1) for n in panel.matrix.shape)
            image.set_data(panel.matrix)
            image.set_cmap(panel.cmap)
            image.set_clim(panel.vmin, panel.vmax)
            image.set_extent((-0.5, cols - 0.5, rows - 0.5, -0.5))
            ax.set_xlim(-0.5, cols - 0.5)
            ax.set_ylim(rows - 0.5, -0.5)
            ax.set_title(panel.title, fontsize=10)
        self.title.set_text(title)
        self.title.set_x(0.5 if len(panels) > 1 else _PANEL / 2)  # over the panel when alone
        self.canvas.draw()
        # One panel alone is cropped to its own width.
        crop = int(self.canvas.get_width_height()[0] * _PANEL) if len(panels) == 1 else None
        return _png(self.canvas, crop)


render_panels = _per_thread(_PanelsCanvas, _PanelsCanvas.render)
