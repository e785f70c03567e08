"""The canvas (service.render.canvas): PNGs of the right size, each cell in its colormap colour
at its place, NaN white, an image drawn over a kept frame identical to one drawn from scratch,
and threads that never share a figure."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import matplotlib
import numpy as np
import pytest

from service.render.canvas import render_grid, render_map
from tests.support.images import pixels, png_size

# The map's axes in figure fractions (left, bottom, width, height) on a 640 x 540 image.
WIDTH, HEIGHT = 640, 540
PLAIN_AXES = (0.12, 0.1, 0.71, 0.81)


def cell_centres(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel row and column of each cell's centre, from the axes' place on the figure."""
    left, bottom, width, height = PLAIN_AXES
    x0, x1 = left * WIDTH, (left + width) * WIDTH
    top = HEIGHT - (bottom + height) * HEIGHT
    ys = top + (np.arange(rows) + 0.5) * (height * HEIGHT / rows)
    xs = x0 + (np.arange(cols) + 0.5) * ((x1 - x0) / cols)
    return ys.astype(int), xs.astype(int)


@pytest.mark.parametrize(("diverging", "cmap"), [(False, "viridis"), (True, "RdBu_r")])
def test_each_cell_has_its_colormap_colour(diverging: bool, cmap: str) -> None:
    rng = np.random.default_rng(7)
    m = rng.random((5, 7)).astype(np.float32)
    if diverging:
        m = m - 0.5
    img = pixels(render_map(m, title="cells", diverging=diverging))
    # Independent expectation: matplotlib's colormap at the value scaled to the colour limits.
    lo, hi = (-np.abs(m).max(), np.abs(m).max()) if diverging else (0.0, m.max())
    expected = matplotlib.colormaps[cmap]((m - lo) / (hi - lo), bytes=True)[..., :3]
    ys, xs = cell_centres(*m.shape)
    got = img[ys[:, None], xs[None, :]]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_nan_cells_are_white_and_large_maps_fill_the_axes() -> None:
    m = np.random.default_rng(8).random((300, 600)).astype(np.float32)
    m[100:200] = np.nan
    img = pixels(render_map(m, title="big"))
    ys, xs = cell_centres(3, 3)  # the middle third of the rows is NaN
    assert (img[ys[1], xs] == 255).all()
    assert (img[ys[[0, 2]][:, None], xs[None, :]] != 255).any(axis=-1).all()


def test_a_kept_frame_draws_the_same_image_as_a_fresh_one() -> None:
    rng = np.random.default_rng(9)
    a, b = rng.random((6, 6)).astype(np.float32), rng.random((9, 4)).astype(np.float32)
    tokens = [f"t{i}" for i in range(6)]
    results: dict[str, bytes] = {}

    def fresh(name: str, fn) -> None:  # a new thread: its own, new figures
        results[name] = fn()

    def draw_a() -> bytes:
        return render_map(a, title="a", xlabels=tokens, ylabels=tokens)

    def draw_a2() -> bytes:
        return render_map(a * 0.5, title="a again", xlabels=tokens, ylabels=tokens)

    def draw_a3() -> bytes:  # only an axis label differs from a
        return render_map(a, title="a", ylabel="position", xlabels=tokens, ylabels=tokens)

    for name, fn in (("a", draw_a), ("a2", draw_a2), ("a3", draw_a3)):
        t = threading.Thread(target=fresh, args=(name, fn))
        t.start()
        t.join()
    # In this thread: the frame of a is kept between a and a2, and rebuilt after b.
    assert draw_a() == results["a"]
    assert draw_a2() == results["a2"]
    assert draw_a3() == results["a3"] != results["a"]
    render_map(b, title="b")
    assert draw_a() == results["a"]


def test_grid_panels_show_their_maps_on_one_scale() -> None:
    maps = np.zeros((4, 3, 3), np.float32)
    maps[2] = 1.0  # one bright panel, three dark
    img = pixels(render_grid(maps, [f"head {i}" for i in range(4)], title="grid"))
    viridis = matplotlib.colormaps["viridis"]
    dark, bright = (np.array(viridis(v, bytes=True)[:3]) for v in (0.0, 1.0))
    # 2 x 2 panels: their centres in the gridspec's area (left 0.06 .. right 0.86, 0.06 .. 0.9).
    h, w = img.shape[:2]
    xs = [int(w * (0.06 + 0.8 * f)) for f in (0.25, 0.75)]
    ys = [int(h * (1 - (0.06 + 0.84 * f))) for f in (0.75, 0.25)]
    centres = [img[y, x] for y in ys for x in xs]
    assert [tuple(c) for c in centres] == [tuple(dark)] * 2 + [tuple(bright), tuple(dark)]


def test_render_map_is_a_png_with_or_without_labels() -> None:
    m = np.random.default_rng(0).random((12, 9)).astype(np.float32)
    plain = render_map(m, title="t")
    labelled = render_map(
        m, title="t", xlabels=[f"k{i}" for i in range(9)], ylabels=[f"q{i}" for i in range(12)]
    )
    assert png_size(plain) == png_size(labelled) == (640, 540)
    assert plain != labelled
    signed = render_map(m - 0.5, title="pe", xlabel="dimension", ylabel="position", diverging=True)
    assert png_size(signed) == (640, 540)


def test_render_handles_nan_and_constant_maps() -> None:
    m = np.full((4, 4), np.nan, np.float32)
    assert png_size(render_map(m, title="nan")) == (640, 540)
    assert png_size(render_map(np.zeros((3, 5), np.float32), title="zeros")) == (640, 540)
    assert png_size(render_map(np.ones((1, 1), np.float32), title="one")) == (640, 540)


def test_rendering_in_threads_equals_rendering_in_sequence() -> None:
    # Each worker thread keeps its own figure: concurrent renders must not interfere.
    rng = np.random.default_rng(1)
    maps = [rng.random((16, 16)).astype(np.float32) for _ in range(12)]
    sequential = [render_map(m, title=f"m{i}") for i, m in enumerate(maps)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda im: render_map(im[1], title=f"m{im[0]}"), enumerate(maps)))
    assert threaded == sequential


def test_grid_has_one_panel_per_head() -> None:
    maps = np.random.default_rng(2).random((5, 8, 8)).astype(np.float32)
    w, h = png_size(render_grid(maps, [f"head {i}" for i in range(5)], title="grid"))
    assert w > 0 and h > 0
