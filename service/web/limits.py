"""Size limits checked before any memory is allocated for a computation's results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from service.core.errors import InputError, LimitError
from service.web.settings import Settings


@dataclass(frozen=True)
class Limits:
    """The service's limits; each check raises LimitError (413) or InputError (422)."""

    max_elements: int
    max_weight_elements: int
    heatmap_max_side: int
    heatmap_max_images: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.max_elements, s.max_weight_elements, s.heatmap_max_side, s.heatmap_max_images)

    def elements(self, loc: str | tuple[str | int, ...], shape: Sequence[int], what: str) -> None:
        """A tensor the service would allocate (an output, say) must fit ATTN_MAX_ELEMENTS."""
        n = math.prod(shape)
        if n > self.max_elements:
            raise LimitError(
                loc,
                f"{what} of shape {list(shape)} would have {n} elements; "
                f"the limit (ATTN_MAX_ELEMENTS) is {self.max_elements}",
            )

    def weight_elements(self, loc: str | tuple[str | int, ...], n: int) -> None:
        if n > self.max_weight_elements:
            raise LimitError(
                loc,
                f"the projection weights would have {n} elements; "
                f"the limit (ATTN_MAX_WEIGHT_ELEMENTS) is {self.max_weight_elements}",
            )

    def heatmap(self, loc: str | tuple[str | int, ...], lq: int, lk: int, images: int) -> None:
        """Heatmaps are exact L x L pictures: refuse sizes beyond ATTN_HEATMAP_MAX_SIDE."""
        if max(lq, lk) > self.heatmap_max_side:
            raise InputError(
                loc,
                f"a heatmap of {lq} query x {lk} key positions exceeds the limit of "
                f"{self.heatmap_max_side} positions per side (ATTN_HEATMAP_MAX_SIDE); "
                "ask without a heatmap",
            )
        if images > self.heatmap_max_images:
            raise InputError(
                loc,
                f"{images} heatmap images were asked for; the limit (ATTN_HEATMAP_MAX_IMAGES) is "
                f"{self.heatmap_max_images}; choose fewer heads",
            )
