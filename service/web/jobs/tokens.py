"""The jobs of /v1/tokens: self-attention over a token sequence (embeddings, positional
encoding, multi-head attention, heatmaps), or a text through a real model (its analysis and
BertViz-style pictures)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.core.cost import multihead_cost
from service.core.model import (
    Analysis,
    ModelIntegrityError,
    ModelNotInstalled,
    SentenceModel,
    get_model,
)
from service.core.options import MultiheadOptions
from service.core.results import TokensResult
from service.core.tokens import Positional, self_attention
from service.core.weights import head_layout
from service.render.model_views import ModelView, picture_count, render_pictures
from service.web import images
from service.web.deps import AppState
from service.web.images import HeatmapSpec
from service.web.problems import ModelNotAvailable, ModelRefused


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
