"""The BertViz-style pictures (service/render/model_views.py), read back from their PNG and SVG.

Inputs are made here, so the expected picture is known: which lines a head view draws and how
opaque, how a model view pools a long map, which labels a map carries.
"""

from __future__ import annotations

import io
import re
import threading
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from service.render import model_views as mv

SVG = "{http://www.w3.org/2000/svg}"


def random_attention(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Rows that sum to 1, with a few heavy weights and many light ones, like a real head."""
    logits = rng.standard_normal(shape) * 3.0
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


def texts(svg: bytes) -> list[str]:
    """Every text the SVG draws (matplotlib writes each one's string as a comment)."""
    return re.findall(r"<!-- (.*?) -->", svg.decode())


def lines(svg: bytes) -> list[tuple[str, float]]:
    """(stroke colour, stroke opacity) of each line of the head view's LineCollection."""
    root = ET.fromstring(svg)
    group = next(g for g in root.iter(f"{SVG}g") if g.get("id", "").startswith("LineCollection"))
    out = []
    for path in group.iter(f"{SVG}path"):
        style = dict(
            part.strip().split(": ") for part in path.get("style", "").split(";") if part.strip()
        )
        out.append((style["stroke"], float(style.get("stroke-opacity", 1.0))))
    return out


def png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return im.size


def test_head_view_draws_each_weight_as_a_line_whose_opacity_is_the_weight() -> None:
    rng = np.random.default_rng(1)
    tokens = ["[CLS]", "the", "cat", "sat", "[SEP]"]
    attn = random_attention(rng, 2, 5, 5)
    svg = mv.head_view(attn, tokens, layer=3, heads=[4, 9], title="test", fmt="svg")
    drawn = sorted((c, round(o, 4)) for c, o in lines(svg))
    expected = sorted(
        (mv.head_colour(head), round(float(w), 4))
        for k, head in enumerate([4, 9])
        for w in attn[k].ravel()
        if w >= 0.01
    )
    assert drawn == expected
    assert mv.head_colour(4) != mv.head_colour(9)
    shown = texts(svg)
    assert shown.count("[CLS]") == 2 and shown.count("cat") == 2  # query and key columns
    assert "test, layer 3" in shown and "head 4" in shown and "head 9" in shown


def test_a_head_view_of_a_long_input_draws_only_its_heaviest_lines_and_says_so() -> None:
    rng = np.random.default_rng(2)
    n = 400
    attn = random_attention(rng, 12, n, n)
    svg = mv.head_view(
        attn, [f"t{i}" for i in range(n)], layer=0, heads=range(12), title="x", fmt="svg"
    )
    drawn = lines(svg)
    visible = np.sort(attn[attn >= 0.01])[::-1]
    assert visible.size > 20_000 and len(drawn) == 20_000
    lightest = min(o for _, o in drawn)
    assert lightest == pytest.approx(float(visible[19_999]), abs=1e-4)
    note = next(t for t in texts(svg) if t.startswith("lines under"))
    assert f"{lightest:.2g}" in note and "one label in 2 shown" in note
    assert len({c for c, _ in drawn}) == 12  # every head in its own colour


def test_model_view_is_a_grid_of_one_map_per_layer_and_head() -> None:
    rng = np.random.default_rng(3)
    attn = random_attention(rng, 6, 12, 9, 9)
    svg = mv.model_view(attn, layers=range(6), heads=range(12), title="minilm", fmt="svg")
    root = ET.fromstring(svg)
    assert len(list(root.iter(f"{SVG}image"))) == 2  # the maps in one image, the colorbar
    shown = texts(svg)
    assert [f"layer {n}" for n in range(6)] == [t for t in shown if t.startswith("layer")]
    assert [f"head {n}" for n in range(12)] == [t for t in shown if t.startswith("head")]
    assert "minilm: 9 queries x 9 keys" in shown
    fewer = mv.model_view(attn[[2, 5]][:, [0, 7, 11]], layers=[2, 5], heads=[0, 7, 11], title="m")
    (w_all, h_all), (w_few, h_few) = (
        png_size(mv.model_view(attn, layers=range(6), heads=range(12), title="m")),
        png_size(fewer),
    )
    assert w_few < w_all and h_few < h_all


def test_model_view_pools_long_maps_into_bins_of_mean_weight() -> None:
    rng = np.random.default_rng(4)
    attn = random_attention(rng, 1, 2, 300, 300)
    maps = mv.panel_maps(attn)
    assert maps.shape == (1, 2, 80, 80)
    edges = [(b * 300) // 80 for b in range(81)]
    for r, c in [(0, 0), (17, 42), (79, 79)]:
        cell = attn[0, 1, edges[r] : edges[r + 1], edges[c] : edges[c + 1]]
        assert maps[0, 1, r, c] == pytest.approx(float(cell.mean()), rel=1e-5)
    assert mv.panel_maps(attn[..., :80, :80]) is not None
    np.testing.assert_array_equal(mv.panel_maps(attn[..., :80, :80]), attn[..., :80, :80])
    svg = mv.model_view(attn, layers=[0], heads=[3, 4], title="m", fmt="svg")
    assert "m: 300 queries x 300 keys (pooled to 80x80 bins of mean weight)" in texts(svg)


@pytest.mark.filterwarnings("ignore:Glyph .* missing from font")  # DejaVu Sans has no CJK
def test_head_map_labels_both_axes_with_the_wordpieces() -> None:
    tokens = ["[CLS]", "$x$", "naïve", "東京", "🤗", "a" * 30, "[SEP]"]
    attn = random_attention(np.random.default_rng(5), 7, 7)
    svg = mv.head_map(attn, tokens, title="layer 1, head 2", fmt="svg")
    shown = texts(svg)
    for token in ["[CLS]", "$x$", "naïve", "[SEP]", "a" * 11 + "…"]:
        assert shown.count(token) == 2, token  # x and y tick labels
    assert "layer 1, head 2" in shown
    assert png_size(mv.head_map(attn, tokens, title="t")) == (740, 640)


def test_pictures_are_the_same_from_several_threads_at_once() -> None:
    rng = np.random.default_rng(6)
    attn = random_attention(rng, 2, 3, 20, 20)
    tokens = [f"w{i}" for i in range(20)]

    def draw() -> list[bytes]:
        return [
            mv.model_view(attn, layers=[0, 1], heads=[0, 1, 2], title="m"),
            mv.head_view(attn[1], tokens, layer=1, heads=[0, 1, 2], title="h"),
            mv.head_map(attn[0, 2], tokens, title="one head"),
        ]

    serial = draw()
    results: list[list[bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(draw())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and all(r == serial for r in results)


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_inputs_that_do_not_match_are_refused(fmt: str) -> None:
    attn = np.full((2, 4, 4), 0.25, np.float32)
    with pytest.raises(ValueError):
        mv.head_view(attn, ["a", "b", "c"], layer=0, heads=[0, 1], title="t", fmt=fmt)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mv.model_view(attn[None], layers=[0], heads=[0], title="t", fmt=fmt)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        mv.head_map(attn[0], ["a"], title="t", fmt=fmt)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="format"):
        mv.head_map(attn[0], list("abcd"), title="t", fmt="gif")  # type: ignore[arg-type]
