"""The pictures stay as they were: today's rendering against stored reference images.

tests/render/reference/*.png were drawn by service/render as of commit d10df2c (before the
colorbar's strip joined the cached frame and several frames were kept, issue 18), from the
deterministic cases below, with
`python -m tests.render.test_reference_images` (which rewrites them: only for a deliberate change
of the pictures). Each test draws its case again and compares pixels: a user would notice a
moved tick, a missing label or other colours; the tolerance admits only anti-aliasing noise.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.render.canvas import render_grid, render_map
from service.render.views import render_positional, render_weights

REFERENCE = Path(__file__).parent / "reference"
TOKENS = ["The", "cat", "sat", "on", "the", "mat", "because", "it", "was", "warm", ".", "Then",
          "it", "slept", "all", "day"]  # fmt: skip


def _softmax(x: np.ndarray) -> np.ndarray:
    w = np.exp(x - x.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def _weights(heads: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return _softmax(rng.standard_normal((1, heads, n, n)) * 2).astype(np.float32)


def _tokens_request() -> list[bytes]:
    """What /v1/tokens draws by default for 16 tokens: every head, their mean and the grid."""
    images = render_weights(_weights(8, 16, 1), batch=0, heads="all", tokens=TOKENS, title="x")
    return [image.png for image in images]


def _sinusoidal(n: int, d: int) -> np.ndarray:
    pos = np.arange(n)[:, None] / 10000 ** (np.arange(0, d, 2)[None, :] / d)
    return np.concatenate([np.sin(pos), np.cos(pos)], axis=1).astype(np.float32)


CASES: dict[str, Callable[[], list[bytes]]] = {
    "tokens16": _tokens_request,
    "grid12": lambda: [
        render_grid(_weights(12, 16, 2)[0], [f"head {h}" for h in range(12)], title="12 heads")
    ],
    "map512": lambda: [render_map(_weights(1, 512, 3)[0, 0], title="attention, batch 0, head 0")],
    # Two maps of one frame with different colour limits: the second reuses the first's frame.
    "two_scales": lambda: [
        render_map(_weights(1, 64, 4)[0, 0] * s, title=f"scaled {s}") for s in (1.0, 0.37)
    ],
    "positional": lambda: [render_positional(_sinusoidal(16, 32), "sinusoidal", TOKENS)],
    # Two frames in turn (a request's heads, its positional encoding, the next request's heads):
    # the third image starts from a kept frame while the figure was last set for another.
    "alternating": lambda: [
        render_map(_weights(1, 16, 5)[0, 0], title="head 0", xlabels=TOKENS, ylabels=TOKENS),
        render_positional(_sinusoidal(16, 32), "sinusoidal", TOKENS),
        render_map(_weights(1, 16, 6)[0, 0], title="head 1", xlabels=TOKENS, ylabels=TOKENS),
    ],
}


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("case", list(CASES))
def test_pictures_equal_the_reference_images(case: str) -> None:
    for i, png in enumerate(CASES[case]()):
        path = REFERENCE / f"{case}_{i}.png"
        want, got = _pixels(path.read_bytes()), _pixels(png)
        assert got.shape == want.shape, path.name
        diff = np.abs(got - want).max(axis=-1)
        # Anti-aliasing may move a channel by a few levels at text edges; nothing else may move.
        assert (diff > 48).mean() < 1e-4, (path.name, int((diff > 48).sum()))
        assert (diff > 8).mean() < 2e-3, (path.name, int((diff > 8).sum()))


def main() -> None:
    REFERENCE.mkdir(exist_ok=True)
    for case, draw in CASES.items():
        for i, png in enumerate(draw()):
            (REFERENCE / f"{case}_{i}.png").write_bytes(png)


if __name__ == "__main__":
    main()
