"""The work behind each HTTP front, shared by /v1 and the Open Inference Protocol (/v2).

Every request goes one way: the route parses its own wire format into the options model,
tensors and a heatmap spec; a job here checks the limits before anything large is allocated,
runs the compute core and draws the heatmaps (service.web.images); the route encodes the plain
result in its own format. Errors name the option fields (InputError); each front maps those
locations onto its own names. `compute` lets a front name the core function it runs (one place
to wrap it, as the overload tests do on the /v1 routes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from service.core.approx import check_options
from service.core.attention import attention
from service.core.cost import attention_cost, multihead_cost
from service.core.errors import InputError
from service.core.inputs import as_4d
from service.core.maps import attention_map
from service.core.memory import slot_count
from service.core.model import (
    Analysis,
    ModelIntegrityError,
    ModelNotInstalled,
    SentenceModel,
    get_model,
)
from service.core.multihead import multihead_attention
from service.core.options import AttentionOptions, MultiheadOptions
from service.core.results import AttentionMaps, AttentionResult, MultiheadResult, TokensResult
from service.core.tokens import Positional, self_attention
from service.core.weights import head_layout
from service.render.model_views import ModelView, picture_count, render_pictures
from service.web import images
from service.web.deps import AppState
from service.web.images import HeatmapSpec
from service.web.problems import ModelNotAvailable, ModelRefused

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
    _rows_without_heatmap(opts.weights_rows, spec)
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


def _rows_without_heatmap(weights_rows: list[int] | None, spec: HeatmapSpec | None) -> None:
    if weights_rows is not None and spec is not None:
        raise InputError(
            "weights_rows",
            "returns chosen rows of the weights, a heatmap draws all of them: ask for one or "
            "the other",
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
    _rows_without_heatmap(opts.weights_rows, spec)
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


@dataclass(frozen=True)
class TokensJob:
    """result: as service.core.tokens returns it. weights: per head (H, L, L), or averaged
    (L, L) when average_weights. heatmaps: the drawn images; positional: the picture of the
    positional encoding (None without heatmaps, or with positional "none")."""

    result: TokensResult
    weights: np.ndarray
    heatmaps: list[dict]
    positional: dict | None


def run_tokens(
    state: AppState,
    tokens: list[str],
    opts: MultiheadOptions,
    spec: HeatmapSpec | None,
    *,
    d_model: int,
    positional: Positional,
) -> TokensJob:
    """Embeddings, positions and multi-head self-attention, with token-labelled heatmaps."""
    images.check_store(spec, state.store)
    n, d, h = len(tokens), d_model, opts.num_heads
    # Everything this request would allocate is checked before embedding a single token.
    limits = state.limits
    hkv, head_dim = head_layout(d, h, opts.num_kv_heads)
    kv = hkv * head_dim
    weight_elements = 2 * d * d + 2 * kv * d + 2 * d + 2 * kv
    limits.weight_elements("d_model", weight_elements)
    limits.elements("tokens", (n, d), "the embeddings")
    limits.elements("tokens", (h, n, n), "the weights")
    # the embeddings count as weights: drawn, not sent
    cost = multihead_cost(
        (n, d),
        (n, d),
        (n, d),
        opts,
        kv_dim=kv,
        weights=True,
        weight_elements=weight_elements + n * d,
    )
    limits.work(cost)
    if spec is not None:
        if spec.tokens is None:
            spec = spec.model_copy(update={"tokens": tokens})
        images.check_spec(spec, (1, h, n, n), limits)
    result = self_attention(
        tokens,
        d_model=d,
        num_heads=h,
        num_kv_heads=opts.num_kv_heads,
        positional=positional,
        seed=opts.seed,
        weights=opts.weights,
        masking=opts,
        num_threads=state.num_threads,
    )
    drawn: list[dict] = []
    picture = None
    if spec is not None:
        drawn = images.draw_weights(result.weights, spec, state.store, title="tokens")
        if result.positional is not None:
            labels = tokens if n <= 1024 else None
            picture = images.draw_positional(
                result.positional, positional, labels, state.store, spec.inline
            )
    weights = result.weights.mean(axis=0) if opts.average_weights else result.weights
    return TokensJob(result, weights, drawn, picture)


@dataclass(frozen=True)
class ModelJob:
    """A real model's analysis of one input, its pictures' references and, in words, what the
    answer cut or left out (notes)."""

    model: SentenceModel
    analysis: Analysis
    heatmaps: list[dict]
    notes: list[str]


def load_model(name: str) -> SentenceModel:
    """The loaded model; 404 when its package is missing, 503 when its files were refused."""
    try:
        return get_model(name)
    except ModelNotInstalled as exc:
        raise ModelNotAvailable(str(exc)) from None
    except ModelIntegrityError as exc:
        raise ModelRefused(f"model {name!r} cannot run on this server: {exc}") from None


def run_model(
    state: AppState,
    name: str,
    text: str,
    text_pair: str | None,
    *,
    truncate: bool,
    layers: Sequence[int] | None,
    heads: Sequence[int] | None,
    need_weights: bool,
    views: Sequence[ModelView] | None,
    inline: bool,
) -> ModelJob:
    """Tokenise, check the limits against the input's length, run the model, draw `views`."""
    if views is not None and not inline:
        state.store.check_available()
    model = load_model(name)
    prepared = model.prepare(text, text_pair, truncate=truncate, layers=layers, heads=heads)
    enc = prepared.encoding
    n, nl, nh = len(enc), len(prepared.layers), len(prepared.heads)
    # The kernel makes one (heads, L, L) tensor per layer, and the model has a fixed number of
    # layers (6 for MiniLM), so a layer is what ATTN_MAX_ELEMENTS bounds: the defaults admit
    # every weight of a 512-wordpiece input (6 x 12 x 512 x 512 in all).
    if need_weights or views is not None:
        state.limits.elements("heads", (nh, n, n), f"each of the {nl} layers' attention weights")
    if views is not None:
        state.limits.heatmap("heatmap", n, n, picture_count(views, nl, nh))
    analysis = model.analyse_prepared(prepared, num_threads=state.num_threads)
    drawn: list[dict] = []
    if views is not None:
        pictures = render_pictures(
            analysis.attentions,
            enc.tokens,
            layers=analysis.layers,
            heads=analysis.heads,
            views=views,
            title=name,
            svg=not inline,
        )
        drawn = images.publish_pictures(pictures, state.store, inline)
    notes = []
    if enc.truncated:
        notes.append(
            f"the input has {enc.full_length} wordpieces; the model read the first "
            f"{n} (its {model.max_positions} positions)"
        )
    if analysis.embedding_truncated:
        notes.append(
            f"the embedding was computed from the first {analysis.embedding_length} of "
            f"{enc.full_length} wordpieces, as sentence-transformers computes it for this model "
            f"(max_seq_length {model.embedding_max_length})"
        )
    return ModelJob(model, analysis, drawn, notes)
