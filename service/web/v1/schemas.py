"""Request and response models of the /v1 HTTP API, each documented with an example.

Request models extend the shared options models (service.core.options), so every option keeps its
name, default and validation; they only add the tensors, the heatmap request and the response
encoding. Tensors are validated by the Tensor type (numpy in bulk).
Slightly over 400 lines: the models of the exact, multi-head and token routes share their
bases and examples (the real model's and the sessions' models have their own modules).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

from service.core.errors import InputError
from service.core.options import FAIL_FAST, AttentionOptions, MultiheadOptions
from service.core.split import MAX_CHUNKS
from service.core.tensor_codec import Encoding, encoding_of
from service.core.tensor_field import Tensor
from service.core.tokens import Positional
from service.web.docs import example_config
from service.web.images import URL_PREFIX, HeatmapSpec

_ENCODING_DOC = (
    'How result tensors are encoded: "list" (nested lists; NaN/Inf become null) or "b64" '
    "({dtype, shape, b64}); default: as the request encoded its first tensor."
)

# ---------------------------------------------------------------------------------------------
# Heatmaps


_HEATMAP_DOC = (
    'true, or {"batch", "heads": [int] | "all" | "mean", "tokens": [str], "inline": bool}. '
    "Draws PNG heatmaps of the attention weights; /v1/attention (exact) pools a side longer "
    "than ATTN_HEATMAP_MAX_SIDE into that many bins of mean weight (the title says so), other "
    "endpoints refuse it."
)


class _WithHeatmap(BaseModel):
    """Adds `heatmap`: true (every default), false/null (none) or a HeatmapSpec object."""

    heatmap: HeatmapSpec | None = Field(None, description=_HEATMAP_DOC)

    @field_validator("heatmap", mode="before")
    @classmethod
    def _heatmap_spec(cls, value: Any) -> Any:
        return heatmap_flag(value, HeatmapSpec, "{batch, heads, tokens, inline}")


def heatmap_flag(value: Any, spec: type[BaseModel], fields: str) -> Any:
    """A request's "heatmap" before validation: true = `spec`'s defaults, false = none, else
    the object (or null) as given."""
    if value is True:
        return spec()
    if value is False:
        return None
    if value is not None and not isinstance(value, dict | spec):
        raise ValueError(f"expected true, false or an object {fields}")
    return value


# Example ids of a heatmap and of a positional-encoding picture.
_HEATMAP_ID, _PICTURE_ID = "Qm9vZ3VzLUV4YW1wbGUtSUQ", "UG9zaXRpb25hbC1FeGFtcGxl"


def _image_example(image_id: str, **shows: Any) -> dict[str, Any]:
    return {"id": image_id, "url": f"{URL_PREFIX}/{image_id}.png", **shows}


_HEATMAP_EXAMPLE = _image_example(_HEATMAP_ID, batch=0, head=0)


class ImageRef(BaseModel):
    """An image: stored (id and url) or inline (png)."""

    model_config = example_config(
        _image_example(_PICTURE_ID),
    )

    id: str | None = Field(None, description="Store id (absent when inline).")
    url: str | None = Field(None, description="Path of the PNG, relative to the service.")
    png: str | None = Field(None, description="Base64 PNG (only when inline).")


class HeatmapRef(ImageRef):
    """One heatmap image: stored (id and url) or inline (png), and what it shows."""

    model_config = example_config(
        _HEATMAP_EXAMPLE,
    )

    batch: int
    head: int | Literal["mean", "all"] = Field(
        description='Head index, "mean" (head average) or "all" (grid of the heads).'
    )


class _Encoded(BaseModel):
    """Adds the response encoding, defaulting to that of the request's first tensor."""

    encoding: Encoding | None = Field(None, description=_ENCODING_DOC)

    @classmethod
    def _first_tensor_field(cls) -> str:
        raise NotImplementedError

    @model_validator(mode="before")
    @classmethod
    def _default_encoding(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("encoding") is None:
            data = {**data, "encoding": encoding_of(data.get(cls._first_tensor_field()))}
        return data


# ---------------------------------------------------------------------------------------------
# /v1/attention

_QKV_EXAMPLE: Any = [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]]


def _json_numbers_as_float(value: Any) -> Any:
    # JSON writes 1.0 as 1 as often as not: integer arrays from JSON are float data.
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return value.astype(np.float64)
    return value


class _EncodedQKV(_Encoded):
    """A request of q, k and v: integer arrays from JSON are read as floats, and the response's
    encoding defaults to that of q."""

    q: Tensor = Field(description="Queries (.., Hq, Lq, D).")
    k: Tensor = Field(description="Keys (.., Hkv, Lk, D); Hq must be a multiple of Hkv.")
    v: Tensor = Field(description="Values (.., Hkv, Lk, Dv).")

    _floats = field_validator("q", "k", "v")(_json_numbers_as_float)

    @classmethod
    def _first_tensor_field(cls) -> str:
        return "q"


class AttentionRequest(_WithHeatmap, _EncodedQKV, AttentionOptions):
    """Scaled dot-product attention. q (Lq, D), (Hq, Lq, D) or (B, Hq, Lq, D); k and v alike."""

    model_config = example_config(
        {
            "q": _QKV_EXAMPLE,
            "k": _QKV_EXAMPLE,
            "v": _QKV_EXAMPLE,
            "causal": True,
            "return_weights": True,
            "heatmap": {"tokens": ["a", "b", "c"], "inline": False},
        },
    )

    # Extra outputs of this response (like heatmap), not attention options: the Python API
    # has service.attention_map for them.
    stats: bool = Field(
        False,
        description="Also return, per query, the entropy of its attention row and its top_k "
        "keys with their weights, and per key the total attention it receives (column sums). "
        "Exact method only; computed in O(L) memory at any length.",
    )
    top_k: int = Field(8, ge=1, le=256, description='Keys per query in "stats".')
    chunks: int | None = Field(
        None,
        ge=1,
        le=MAX_CHUNKS,
        description="Split the keys into this many slices, each computed by a task on the Ray "
        "cluster, merged exactly (service.distributed_attention): only when the server runs "
        "on Ray Serve (`attention-service ray`), else 422. Exact method; not with stats or "
        "pooled heatmaps.",
    )


class Meta(BaseModel):
    shape: list[int] = Field(description="Shape of the output.")
    elapsed_ms: float = Field(description="Native compute time in milliseconds.")
    flops: int = Field(description="Floating-point operations of the computation (dense count).")
    method: str = Field(description='"exact" or the approximation used.')


class Comparison(BaseModel):
    """An approximation measured against exact attention on the same input ("compare": true)."""

    method: str
    rel_error: float = Field(description="||approx - exact||_F / ||exact||_F over all heads.")
    max_abs_error: float
    rel_error_per_head: Tensor = Field(description="(.., Hq): the relative error per head.")
    implied_map: Tensor = Field(
        description="(.., Hq, Pq, Pk): bin means of the approximation's implied matrix M "
        "(output = M v), pooled to at most 256 bins a side."
    )
    exact_map: Tensor | None = Field(
        None, description="The exact weights in the same bins (null when too large to form)."
    )
    pooled: bool = Field(description="Whether a bin holds more than one (query, key) cell.")
    map_kind: str
    exact_elapsed_ms: float
    approx_elapsed_ms: float


class TopK(BaseModel):
    indices: Tensor = Field(
        description="(.., Hq, Lq, K) int64 key indices, largest weight first, ties by the "
        "smaller index; -1 past a row's allowed keys. K = min(top_k, Lk)."
    )
    weights: Tensor = Field(description="(.., Hq, Lq, K) their probabilities (0 past the keys).")


class AttentionStats(BaseModel):
    """Per-query and per-key summaries of the exact attention weights ("stats": true)."""

    entropy: Tensor = Field(
        description="(.., Hq, Lq) -sum p ln p of each row, in nats (0 for a row with no allowed "
        'key, NaN/null with empty_rows="nan").'
    )
    top_k: TopK
    column_sums: Tensor = Field(
        description="(.., Hq, Lk) attention each key receives, summed over the query rows."
    )


class AttentionResponse(BaseModel):
    """Attention output; weights and lse only when return_weights or weights_rows."""

    model_config = example_config(
        {
            "output": [[0.1, 0.2, 0.3, 0.4], [0.33, 0.43, 0.53, 0.63]],
            "weights": [[1.0, 0.0], [0.45, 0.55]],
            "lse": [0.03, 0.85],
            "heatmaps": [_HEATMAP_EXAMPLE],
            "meta": {"shape": [2, 4], "elapsed_ms": 0.02, "flops": 64, "method": "exact"},
        },
    )

    output: Tensor = Field(description="(.., Hq, Lq, Dv), q's rank.")
    weights: Tensor | None = Field(
        None, description="(.., Hq, Lq, Lk) probabilities; (.., Hq, len(weights_rows), Lk)."
    )
    lse: Tensor | None = Field(
        None, description="(.., Hq, Lq) row log-sum-exp (-inf: no key); of weights_rows' rows."
    )
    slot_weights: Tensor | None = Field(
        None,
        description="With memory and weights: (.., Hq, Lq, ceil(L/rate)) probabilities of the "
        "compressed slots, 0 where a slot is not visible; `weights` then covers the raw keys.",
    )
    heatmaps: list[HeatmapRef] = Field(default_factory=list)
    comparison: Comparison | None = Field(None, description='Only with "compare": true.')
    stats: AttentionStats | None = Field(None, description='Only with "stats": true.')
    meta: Meta


# ---------------------------------------------------------------------------------------------
# /v1/multihead

_X_EXAMPLE: Any = [[[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]]]


class MultiheadRequest(_WithHeatmap, _Encoded, MultiheadOptions):
    """torch.nn.MultiheadAttention(batch_first=True), with grouped-query heads."""

    model_config = example_config(
        {"query": _X_EXAMPLE, "num_heads": 2, "seed": 0, "need_weights": True},
    )

    query: Tensor = Field(description="(B, Lq, E) or (Lq, E).")
    key: Tensor | None = Field(None, description="(B, Lk, kdim); default: query.")
    value: Tensor | None = Field(None, description="(B, Lk, vdim); default: key.")

    _floats = field_validator("query", "key", "value")(_json_numbers_as_float)

    @model_validator(mode="after")
    def _float_weights(self) -> MultiheadRequest:
        if self.weights is not None:
            for name in type(self.weights).model_fields:
                value = getattr(self.weights, name)
                if value is not None:
                    setattr(self.weights, name, _json_numbers_as_float(value))
        return self

    @classmethod
    def _first_tensor_field(cls) -> str:
        return "query"


class MultiheadMeta(Meta):
    param_count: int = Field(description="Elements of every weight and bias used.")


class MultiheadResponse(BaseModel):
    """Multi-head output; weights only when need_weights (averaged over heads by default)."""

    model_config = example_config(
        {
            "output": [[[0.1, -0.2, 0.3, 0.0], [0.1, -0.2, 0.3, 0.1]]],
            "weights": [[[0.5, 0.5], [0.4, 0.6]]],
            "heatmaps": [],
            "meta": {
                "shape": [1, 2, 4],
                "elapsed_ms": 0.05,
                "flops": 512,
                "method": "exact",
                "param_count": 40,
            },
        },
    )

    output: Tensor = Field(description="(B, Lq, E), query's rank.")
    weights: Tensor | None = Field(
        None, description="(B, Lq, Lk) head average, or (B, H, Lq, Lk) if not average_weights."
    )
    lse: Tensor | None = Field(None, description="(B, H, Lq) row log-sum-exp per head.")
    heatmaps: list[HeatmapRef] = Field(default_factory=list)
    meta: MultiheadMeta


# ---------------------------------------------------------------------------------------------
# /v1/tokens


class TokensRequest(_WithHeatmap, MultiheadOptions):
    """Token sequence -> embeddings -> positional encoding -> multi-head self-attention."""

    model_config = example_config(
        {
            "text": "the cat sat on the mat",
            "d_model": 32,
            "num_heads": 4,
            "positional": "sinusoidal",
            "seed": 0,
            "causal": True,
        },
    )

    tokens: Annotated[list[str], FAIL_FAST] | None = Field(
        None, description="The tokens; or give `text`."
    )
    text: str | None = Field(None, description="Text split on whitespace into tokens.")
    d_model: int = Field(64, ge=1, description="Embedding width (divisible by num_heads).")
    num_heads: int = Field(8, ge=1, description="Attention heads.")
    positional: Positional = Field(
        "sinusoidal",
        description='"sinusoidal" (Vaswani et al.), "learned" (a table drawn from the seed), '
        '"rope" (rotary, applied to q and k in every head) or "none".',
    )
    seed: int = Field(
        0, ge=0, description="Seed of the embeddings, the learned positions and the projections."
    )
    need_weights: bool = Field(True, description="Return the attention weights.")
    average_weights: bool = Field(False, description="Average the returned weights over heads.")
    heatmap: HeatmapSpec | None = Field(
        HeatmapSpec(), description=_HEATMAP_DOC + " Default: every head, token-labelled."
    )
    encoding: Encoding = Field("list", description="Encoding of result tensors.")

    def token_list(self) -> list[str]:
        """The tokens, from `tokens` or from `text` split on whitespace (exactly one given)."""
        if (self.tokens is None) == (self.text is None):
            raise InputError("tokens", "give exactly one of `tokens` or `text`")
        field = "tokens" if self.tokens is not None else "text"
        tokens = self.tokens if self.tokens is not None else (self.text or "").split()
        if not tokens:
            raise InputError(field, "there are no tokens")
        for i, token in enumerate(tokens):
            try:
                token.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape such as "\ud800"
                loc = (field, i) if field == "tokens" else field
                raise InputError(loc, "is not valid Unicode (lone surrogate)") from None
        return tokens


class TokensMeta(MultiheadMeta):
    positional: Positional
    d_model: int
    num_heads: int


class TokensResponse(BaseModel):
    """The self-attention of a token sequence, its weights, heatmaps and positional picture."""

    model_config = example_config(
        {
            "tokens": ["the", "cat"],
            "output": [[0.1, -0.3, 0.2, 0.4], [0.0, 0.2, -0.1, 0.3]],
            "weights": [[[1.0, 0.0], [0.4, 0.6]], [[1.0, 0.0], [0.7, 0.3]]],
            "heatmaps": [_HEATMAP_EXAMPLE],
            "positional_encoding": _image_example(_PICTURE_ID),
            "meta": {
                "shape": [2, 4],
                "elapsed_ms": 0.05,
                "flops": 512,
                "method": "exact",
                "param_count": 64,
                "positional": "sinusoidal",
                "d_model": 4,
                "num_heads": 2,
            },
        },
    )

    tokens: list[str]
    output: Tensor = Field(description="(L, d_model).")
    weights: Tensor | None = Field(None, description="(H, L, L) per head, or (L, L) averaged.")
    heatmaps: list[HeatmapRef] = Field(default_factory=list)
    positional_encoding: ImageRef | None = Field(
        None, description="A picture of the positional encoding added (or rotation applied)."
    )
    meta: TokensMeta


# Request models whose JSON schema the routes reference (they parse bodies themselves).
REQUEST_MODELS: tuple[type[BaseModel], ...] = (AttentionRequest, MultiheadRequest, TokensRequest)
