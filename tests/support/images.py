"""PNG helpers of the rendering and heatmap tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG that Pillow verifies as well formed."""
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def pixels(png: bytes) -> np.ndarray:
    """The image as an (height, width, 3) RGB array."""
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))
