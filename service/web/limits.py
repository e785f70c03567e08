"""Size limits checked before any memory is allocated for a computation's results."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from service.core.cost import MAX_STEP, Cost
from service.core.errors import InputError, LimitError
from service.web.settings import MiB, Settings


@dataclass(frozen=True)
class Limits:
    """The service's limits; each check raises LimitError (413) or InputError (422)."""

    max_elements: int
    max_weight_elements: int
    heatmap_max_side: int
    heatmap_max_images: int
    max_flops: int = 1 << 42
    max_work_bytes: int = 1 << 30

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(
            s.max_elements,
            s.max_weight_elements,
            s.heatmap_max_side,
            s.heatmap_max_images,
            s.max_flops,
            s.max_work_bytes,
        )

    def work(self, cost: Cost) -> None:
        """A computation's cost (service.core.cost) must fit ATTN_MAX_FLOPS and
        ATTN_MAX_WORK_BYTES, and no step of it outlast a cancellation by much (MAX_STEP)."""
        if cost.flops > self.max_flops:
            raise LimitError(
                cost.loc,
                f"{cost.what} would need about {cost.flops:.3g} flops for these shapes and "
                f"options (set-up included); the limit (ATTN_MAX_FLOPS) is {self.max_flops:.3g}",
            )
        if cost.bytes > self.max_work_bytes:
            raise LimitError(
                cost.loc,
                f"{cost.what} would allocate about {cost.bytes / MiB:.0f} MiB for these shapes "
                f"and options (set-up included); the limit (ATTN_MAX_WORK_BYTES) is "
                f"{self.max_work_bytes / MiB:.0f} MiB",
            )
        if cost.step > MAX_STEP:
            raise LimitError(
                "q",
                f"{cost.what} would run {cost.step:.3g} flops in one uncancellable step (its "
                f"random-feature set-up orthogonalises D x D blocks); the most is {MAX_STEP:.3g} "
                "(head dim D <= 1024)",
            )

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
