"""The multi-head attention job (/v1/multihead and /v2's `multihead` model): projection and
attention weights checked against the limits, the core call, per-head heatmaps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.core.cost import multihead_cost
from service.core.multihead import multihead_attention
from service.core.options import MultiheadOptions
from service.core.results import MultiheadResult
from service.core.weights import head_layout
from service.web import images
from service.web.deps import AppState
from service.web.images import HeatmapSpec


@dataclass(frozen=True)
class MultiheadJob:
    """result: as the Python API returns it. weights: the attention weights as the caller asked
    for them (averaged over heads when average_weights), or None. heatmaps: the drawn images."""

    result: MultiheadResult
    weights: np.ndarray | None
    heatmaps: list[dict]


def _check_multihead_sizes(
    state: AppState,
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    opts: MultiheadOptions,
    need_weights: bool,
    spec: HeatmapSpec | None,
) -> None:
    """Projection weights and attention weights must fit the limits before anything is made."""
    if not (2 <= query.ndim <= 3 and key.ndim == query.ndim and value.ndim == query.ndim):
        return  # the Python API names the rank problem
    e, kdim, vdim = query.shape[-1], key.shape[-1], value.shape[-1]
    if e == 0:
        return
    hkv, head_dim = head_layout(e, opts.num_heads, opts.num_kv_heads)
    limits = state.limits
    kv = hkv * head_dim
    if opts.weights is None:
        n = 2 * e * e + kv * (kdim + vdim) + 2 * e + 2 * kv
    else:
        given = [getattr(opts.weights, f) for f in type(opts.weights).model_fields]
        n = sum(a.size for a in given if a is not None)
    limits.weight_elements("weights", n)
    per_head = spec is not None
    if need_weights or per_head:
        rows = query.shape[:-1]
        if opts.weights_rows is not None:
            rows = rows[:-1] + (len(opts.weights_rows),)
        heads = (opts.num_heads,) if per_head or not opts.average_weights else ()
        limits.elements("key", rows[:-1] + heads + rows[-1:] + key.shape[-2:-1], "weights")
        if spec is not None:
            shape4 = (1,) * (3 - query.ndim) + rows[:-1] + (opts.num_heads,)
            images.check_spec(spec, shape4 + (query.shape[-2], key.shape[-2]), limits)
    cost = multihead_cost(
        query.shape,
        key.shape,
        value.shape,
        opts,
        kv_dim=kv,
        weights=need_weights or per_head,
        weight_elements=n,
    )
    limits.work(cost)


def run_multihead(
    state: AppState,
    query: np.ndarray,
    key: np.ndarray | None,
    value: np.ndarray | None,
    opts: MultiheadOptions,
    spec: HeatmapSpec | None,
    *,
    need_weights: bool,
    compute: Callable[..., MultiheadResult] = multihead_attention,
) -> MultiheadJob:
    """Multi-head attention (torch semantics) with optional per-head heatmaps."""
    images.check_store(spec, state.store)
    per_head = spec is not None  # heatmaps need every head, whatever the response averages
    images.check_rows(opts.weights_rows, spec)
    need_weights = need_weights or opts.weights_rows is not None
    k = query if key is None else key
    _check_multihead_sizes(state, query, k, k if value is None else value, opts, need_weights, spec)
    result = compute(
        query,
        key,
        value,
        num_heads=opts.num_heads,
        num_kv_heads=opts.num_kv_heads,
        weights=opts.weights,
        seed=opts.seed,
        average_weights=opts.average_weights and not per_head,
        need_weights=need_weights or per_head,
        options=opts,
        num_threads=state.num_threads,
    )
    weights = result.weights
    drawn: list[dict] = []
    if spec is not None and weights is not None:
        drawn = images.draw_weights(weights, spec, state.store, title="multihead")
        if opts.average_weights:
            weights = np.mean(weights, axis=-3)  # what the Python API does when averaging
    return MultiheadJob(result, weights, drawn)
