"""The attention job (/v1/attention and /v2's `attention` model): limits, the core call
(or its split across a Ray cluster), stats and pooled maps, heatmaps; and which requests are
small enough to run inline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from service.core.approx import check_options
from service.core.attention import attention
from service.core.cost import attention_cost
from service.core.errors import InputError
from service.core.inputs import as_4d
from service.core.maps import attention_map
from service.core.memory import slot_count
from service.core.options import AttentionOptions
from service.core.results import AttentionMaps, AttentionResult
from service.web import images
from service.web.deps import AppState
from service.web.images import HeatmapSpec

# Work small enough to finish on the event loop instead of a worker thread (a few hundred
# microseconds of one core): the dense attention flops, and the answered elements (output and
# weights), whose encoding costs too.
INLINE_MAX_FLOPS = 1 << 25
INLINE_MAX_ELEMENTS = 1 << 16


def fits_inline(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    *,
    heatmap: HeatmapSpec | None,
    stats: bool,
) -> bool:
    """Whether an attention request is small enough for Scheduler.run_request's inline path:
    exact, without heatmaps or stats, and within INLINE_MAX_FLOPS / INLINE_MAX_ELEMENTS."""
    if opts.method != "exact" or heatmap is not None or stats:
        return False
    if min(q.ndim, k.ndim, v.ndim) < 2:
        return True  # refused at once
    rows = int(np.prod(q.shape[:-1], dtype=np.int64))
    lk, d, dv = k.shape[-2], q.shape[-1], v.shape[-1]
    answered = rows * (dv + (lk + 1 if opts.return_weights else 0))
    return 2 * rows * lk * (d + dv) <= INLINE_MAX_FLOPS and answered <= INLINE_MAX_ELEMENTS


@dataclass(frozen=True)
class AttentionJob:
    """result: output (weights and lse when asked), comparison when compare. maps: the stats
    (entropy, top-k, column sums) when asked. heatmaps: the drawn images' references."""

    result: AttentionResult
    maps: AttentionMaps | None
    heatmaps: list[dict]


def run_attention(
    state: AppState,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    spec: HeatmapSpec | None,
    *,
    return_weights: bool,
    stats: bool = False,
    top_k: int = 8,
    compute: Callable[..., AttentionResult] = attention,
    chunks: int | None = None,
) -> AttentionJob:
    """Attention with optional heatmaps (pooled beyond ATTN_HEATMAP_MAX_SIDE) and stats;
    with `chunks`, its keys split across the Ray cluster the server runs on."""
    images.check_store(spec, state.store)
    ranks_ok = 2 <= q.ndim <= 4 and k.ndim == q.ndim and v.ndim == q.ndim
    lq, lk = (q.shape[-2], k.shape[-2]) if ranks_ok else (0, 0)
    side = state.limits.heatmap_max_side
    # Exact heatmaps longer than the limit are pooled (service.core.maps, O(L) memory) instead
    # of drawn from the dense weights; with memory they are drawn up to the limit only.
    exact = opts.method == "exact" and opts.memory is None
    pool = spec is not None and not opts.compare and exact and max(lq, lk) > side
    if chunks is not None:
        compute = _split_compute(state, opts, chunks, stats=stats, pool=pool)
    if stats and opts.method != "exact":
        raise InputError("stats", f'needs method "exact", got "{opts.method}"')
    if stats and opts.memory is not None:
        raise InputError(
            "stats", "cannot be combined with memory; ask for return_weights (and slot_weights)"
        )
    # With memory, the weights and pictures also cover the compressed slots.
    slots = slot_count(lq, opts.memory) if opts.memory is not None else 0
    images.check_rows(opts.weights_rows, spec)
    if opts.weights_rows is not None:
        return_weights = True  # the rows' weights are what weights_rows asks for
    # With "compare", the heatmaps show exact | approximation | difference instead of weights.
    want_weights = return_weights or (spec is not None and not opts.compare and not pool)
    if ranks_ok:
        # Outputs can be far larger than inputs within the limits: refuse before computing.
        rows = q.shape[:-1]
        state.limits.elements("v", rows + v.shape[-1:], "the output")
        if want_weights:
            wrows = rows if opts.weights_rows is None else rows[:-1] + (len(opts.weights_rows),)
            state.limits.elements("k", wrows + (lk + slots,), "the weights")
        if spec is not None:
            shape4 = (1,) * (4 - q.ndim) + rows + k.shape[-2:-1]
            if slots:
                spec = _slots_labelled(spec, lk, slots)
                shape4 = shape4[:3] + (lk + slots,)
            if pool:
                if spec.tokens is not None and len(spec.tokens) != lk:
                    raise InputError(
                        ("heatmap", "tokens"), f"{len(spec.tokens)} labels for {lk} key positions"
                    )
                spec = spec.model_copy(update={"tokens": None})  # bins have no token labels
                shape4 = shape4[:2] + (min(lq, side), min(lk, side))
                state.limits.elements("heatmap", shape4, "the pooled map")
            check = images.check_comparison_spec if opts.compare else images.check_spec
            check(spec, shape4, state.limits)
        if stats:
            state.limits.elements("top_k", rows + (min(top_k, lk),), "the top-k indices")
        # What it will cost, set-up included, before any of it runs: shapes that fit together
        # (else the core's 422 names the problem) and options the method takes, then the model.
        as_4d(q, k, v)
        check_options(opts)
        maps_shape = None
        if pool or stats:
            maps_shape = ((min(lq, side), min(lk, side)) if pool else (1, 1)) + (
                top_k if stats else 0,
            )
        cost = attention_cost(
            q.shape,
            k.shape,
            v.shape,
            opts,
            weights=want_weights,
            maps=maps_shape,
            threads=state.num_threads,
        )
        state.limits.work(cost)
    maps: AttentionMaps | None = None
    if pool or stats:
        maps = attention_map(
            q,
            k,
            v,
            opts,
            bins=(min(lq, side), min(lk, side)) if pool else 1,
            top_k=top_k if stats else 0,
            num_threads=state.num_threads,
        )
    if maps is not None and not want_weights:
        result = AttentionResult(
            output=maps.output, weights=None, lse=None, elapsed_ms=maps.elapsed_ms, flops=maps.flops
        )
    else:
        result = compute(
            q,
            k,
            v,
            opts,
            num_threads=state.num_threads,
            **({"return_weights": True} if want_weights else {}),
        )
    drawn: list[dict] = []
    if spec is not None and result.comparison is not None:
        drawn = images.draw_comparison(result.comparison, spec, state.store)
    elif spec is not None and pool and maps is not None:
        pq, pk = maps.bins
        title = f"attention pooled {lq}×{lk}→{pq}×{pk} (bin means)"
        drawn = images.draw_weights(maps.pooled, spec, state.store, title=title)
    elif spec is not None and result.weights is not None and opts.memory is not None:
        drawn = _draw_memory(result, spec, state, lk, slots)
    elif spec is not None and result.weights is not None:
        drawn = images.draw_weights(result.weights, spec, state.store, title="attention")
    return AttentionJob(result, maps if stats else None, drawn)


def _slots_labelled(spec: HeatmapSpec, lk: int, slots: int) -> HeatmapSpec:
    """The spec for a picture of keys [compressed slots | raw keys]: token labels (one per raw
    key, checked here) get the slots' labels in front."""
    if spec.tokens is None:
        return spec
    if len(spec.tokens) != lk:
        raise InputError(("heatmap", "tokens"), f"{len(spec.tokens)} labels for {lk} key positions")
    return spec.model_copy(update={"tokens": [f"slot {t}" for t in range(slots)] + spec.tokens})


def _draw_memory(
    result: AttentionResult, spec: HeatmapSpec, state: AppState, lk: int, slots: int
) -> list[dict]:
    """The weights of a memory call as one map of keys [compressed slots | raw keys]."""
    weights = np.asarray(result.weights)
    if slots:
        weights = np.concatenate([np.asarray(result.slot_weights), weights], axis=-1)
    sections = [("compressed slots", slots), ("keys", lk)]
    return images.draw_weights(
        weights, spec, state.store, title="attention with memory", sections=sections
    )


def _split_compute(
    state: AppState, opts: AttentionOptions, chunks: int, *, stats: bool, pool: bool
) -> Callable[..., AttentionResult]:
    """distributed_attention with `chunks`, when the server runs on Ray; else a 422."""
    if state.replica.server != "ray":
        raise InputError(
            "chunks",
            "splits the keys across a Ray cluster, and this server runs on uvicorn; start it "
            "with `attention-service ray` (the `ray` extra), or leave chunks out",
        )
    if opts.method != "exact" or opts.compare:
        raise InputError("chunks", 'splits exact attention: only with method "exact"')
    if stats or pool:
        what = "stats" if stats else f"heatmaps over {state.limits.heatmap_max_side} positions"
        raise InputError("chunks", f"cannot be combined with {what} (computed in one process)")
    from service.distributed.attention import distributed_attention  # Ray: only on Ray Serve

    return partial(distributed_attention, chunks=chunks, task_cpus=state.settings.ray_task_cpus)
