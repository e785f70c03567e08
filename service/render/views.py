"""What each picture shows: which heads, titles, axis labels and colour scales.

- `render_weights`: attention weights (B, H, Lq, Lk) of one batch item, per head, as the head
  mean and as a grid of heads (see `plan_heads`).
- `render_comparison`: an approximation against exact attention ("compare"), one PNG per head of
  three panels: the exact map, the approximation's implied map and their difference
  (approximation - exact, diverging colours around 0). Maps are bin means, pooled to at most
  approx.MAP_SIDE a side, so a long sequence is drawn rather than refused; the title says so.
- `render_positional`: the positional encoding added to the token embeddings (or the rotation
  applied to q and k).

Everything is drawn by service.render.canvas. A job abandoned by its HTTP client stops between
images (service.core.cancel.checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from service.core.cancel import checkpoint
from service.render.canvas import Panel, Sections, render_grid, render_map, render_panels

HeadKey = int | Literal["mean", "all"]


@dataclass(frozen=True)
class RenderedImage:
    """One PNG and what it shows: head is an index, "mean" (head average) or "all" (grid)."""

    batch: int
    head: HeadKey
    png: bytes


def plan_heads(num_heads: int, heads: Sequence[int] | str) -> tuple[list[int], bool, bool]:
    """(heads drawn one by one, whether a head-mean image is drawn, whether a grid is drawn).

    "all": every head, plus the mean and a grid when there are several; "mean": the head mean
    only; a list: those heads, plus a grid when there are several.
    """
    if heads == "mean":
        return [], True, False
    if heads == "all":
        return list(range(num_heads)), num_heads > 1, num_heads > 1
    chosen = list(dict.fromkeys(cast(Sequence[int], heads)))  # "all"/"mean" handled above
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
    sections: Sections | None = None,
) -> list[RenderedImage]:
    """Images of weights (B, H, Lq, Lk) for one batch item, as `plan_heads` describes;
    `sections` (label, width) name consecutive ranges of the keys (drawn with separators)."""
    per_head = weights[batch]
    num_heads, lq, lk = per_head.shape
    chosen, mean, grid = plan_heads(num_heads, heads)
    xlabels = tokens
    ylabels = tokens if tokens is not None and lq == lk else None
    images: list[RenderedImage] = []

    def one(matrix: np.ndarray, head: HeadKey, what: str) -> None:
        checkpoint()  # an abandoned HTTP job stops between images
        png = render_map(
            matrix,
            title=f"{title}, batch {batch}, {what}",
            xlabels=xlabels,
            ylabels=ylabels,
            sections=sections,
        )
        images.append(RenderedImage(batch, head, png))

    for h in chosen:
        one(per_head[h], h, f"head {h}")
    if mean:
        one(per_head.mean(axis=0), "mean", "mean of heads")
    if grid:
        checkpoint()
        png = render_grid(
            per_head[chosen],
            [f"head {h}" for h in chosen],
            title=f"{title}, batch {batch}",
            sections=sections,
        )
        images.append(RenderedImage(batch, "all", png))
    return images


def _as_4d(a: np.ndarray) -> np.ndarray:
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


def _comparison_panels(exact: np.ndarray | None, implied: np.ndarray) -> list[Panel]:
    """exact | implied | implied - exact (implied alone when exact is None)."""
    signed = bool((implied < 0).any())  # linformer's implied operator is signed
    top = max(float(np.nanmax(np.abs(implied))), 0.0 if exact is None else float(exact.max()))
    top = top or 1.0
    cmap, vmin = ("RdBu_r", -top) if signed else ("viridis", 0.0)
    approximation = Panel("approximation (implied)", implied, cmap, vmin, top)
    if exact is None:
        return [approximation]
    diff = implied - exact
    bound = float(np.nanmax(np.abs(diff))) or 1.0
    return [
        Panel("exact", exact, cmap, vmin, top),
        approximation,
        Panel("approximation - exact", diff, "RdBu_r", -bound, bound),
    ]


def render_comparison(
    comparison: dict[str, Any], *, batch: int, heads: Sequence[int] | str
) -> list[RenderedImage]:
    """Images of a comparison (service.core.approx.compare) for the heads asked (a head list,
    or "all"/"mean"; no grid)."""
    implied = _as_4d(np.asarray(comparison["implied_map"]))[batch]
    exact_all = comparison["exact_map"]
    exact = None if exact_all is None else _as_4d(np.asarray(exact_all))[batch]
    per_head = _as_4d(np.asarray(comparison["rel_error_per_head"])[..., None, None])[batch]
    chosen, mean, _ = plan_heads(implied.shape[0], heads)
    pooled = comparison["pooled"]
    notes = (
        [f"pooled to {implied.shape[1]}x{implied.shape[2]} bins of mean weight"] if pooled else []
    )
    if exact is None:
        notes.append("exact map not computed at this size")
    images = []
    drawn: list[HeadKey] = [*chosen, "mean"] if mean else [*chosen]
    for head in drawn:
        if head == "mean":
            imp, ex, err = implied.mean(0), None if exact is None else exact.mean(0), None
        else:
            imp, ex = implied[head], None if exact is None else exact[head]
            err = float(per_head[head, 0, 0])
        what = "mean of heads" if head == "mean" else f"head {head}"
        error = f", rel. error {err:.3g}" if err is not None else ""
        title = f"{comparison['method']} vs exact, batch {batch}, {what}{error}"
        title += "".join(f"\n{n}" for n in notes)
        png = render_panels(_comparison_panels(ex, imp), title=title)
        images.append(RenderedImage(batch, head, png))
    return images


def render_positional(table: np.ndarray, positional: str, tokens: Sequence[str] | None) -> bytes:
    """The positional encoding (L, d_model) added to the embeddings, or for "rope" the cos | sin
    of the rotation angles (L, head_dim), one row per position (token-labelled when given)."""
    return render_map(
        table,
        title=f"{positional} positional encoding",
        xlabel="cos | sin of the rotation angles" if positional == "rope" else "dimension",
        ylabel="position",
        ylabels=tokens,
        diverging=True,
    )
