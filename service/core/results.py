"""What the public functions return: frozen dataclasses of arrays, in the library of the q given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core.inputs import ArrayLike
from service.core.options import MultiheadWeights


@dataclass(frozen=True)
class AttentionResult:
    """Result of `attention`.

    output: (.., Hq, Lq, Dv) with q's rank. weights: (.., Hq, Lq, Lk) probabilities and
    lse: (.., Hq, Lq) natural-log sum of exp(scores) over allowed keys, both only when
    return_weights. elapsed_ms: native compute time. flops: 2*B*Hq*Lq*Lk*(D + Dv), the dense
    count of the two matrix products (masked-out tiles the kernel skips are still counted).
    method: "exact", or the approximation used (service/core/approx/, which also fills
    `comparison` when asked to compare with exact attention). slot_weights: with `memory` and
    weights, the probabilities of the compressed slots (.., Hq, Lq, ceil(L/c)), 0 where a slot
    is not visible (weights then cover the raw keys only).
    """

    output: ArrayLike
    weights: ArrayLike | None
    lse: ArrayLike | None
    elapsed_ms: float
    flops: int
    method: str = "exact"
    comparison: dict[str, Any] | None = None
    slot_weights: ArrayLike | None = None


@dataclass(frozen=True)
class MultiheadResult:
    """Result of `multihead_attention`.

    output: (B, Lq, E) (or (Lq, E) unbatched). weights (only when need_weights): (B, Lq, Lk)
    averaged over heads, or (B, H, Lq, Lk) per head; lse: (B, H, Lq) when need_weights.
    param_count: elements in every weight and bias used. flops: the four projections plus
    the dense attention count. weights_used: the float32 weights that were used.
    """

    output: ArrayLike
    weights: ArrayLike | None
    lse: ArrayLike | None
    param_count: int
    elapsed_ms: float
    flops: int
    weights_used: MultiheadWeights


@dataclass(frozen=True)
class AttentionMaps:
    """Result of `attention_map`; leading dims (B, Hq) follow q's rank as in `attention`.

    output (.., Lq, Dv) and lse (.., Lq): as `attention` gives them.
    pooled (.., Pq, Pk): query rows and keys split into near-equal contiguous bins (edges
    (arange(P+1) * L) // P, sizes differing by at most 1); each bin holds the MEAN probability
    of its cells. So for a query bin of non-empty rows, sum over key bins of
    pooled * key-bin width = 1 (with equal widths w: each pooled row sums to 1/w). Rows with no
    allowed key add 0. Pq, Pk are clamped to Lq, Lk (bins = (Lq, Lk) is the dense matrix).
    entropy (.., Lq): -sum_j p log p in nats of each attention row (0 for a row with no allowed
    key, NaN with empty_rows="nan").
    top_k_indices (.., Lq, K) int64 and top_k_weights (.., Lq, K): the K largest probabilities
    of each row, largest first, ties broken by the smaller key index; past a row's allowed keys
    index -1 and weight 0 (NaN with empty_rows="nan" for an empty row). K = min(top_k, Lk).
    column_sums (.., Lk): total attention each key receives, summed over query rows.
    """

    output: ArrayLike
    lse: ArrayLike
    pooled: ArrayLike
    entropy: ArrayLike
    top_k_indices: ArrayLike
    top_k_weights: ArrayLike
    column_sums: ArrayLike
    bins: tuple[int, int]
    elapsed_ms: float
    flops: int


@dataclass(frozen=True)
class TokensResult:
    """Result of `tokens.self_attention`."""

    output: np.ndarray  # (L, d_model)
    weights: np.ndarray  # (H, L, L) per head
    positional: np.ndarray | None  # the picture's data: (L, d_model), or (L, head_dim) for rope
    param_count: int
    elapsed_ms: float
    flops: int
