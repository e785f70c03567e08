"""/v1/tokens with "model": a real model's request and response, and GET /v1/models."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.core.model import MODELS
from service.core.tensor_codec import Encoding
from service.render.model_views import ModelView
from service.web.v1.schemas import heatmap_flag

ModelName = Literal["minilm-l6"]
assert set(MODELS) == {"minilm-l6"}, "ModelName lists every model of the registry"

# A text this long is far past the 512 wordpieces any model here reads; it bounds the cost of
# tokenising (and of "truncate": true, which tokenises everything before cutting).
MAX_TEXT_CHARS = 100_000

_VIEWS_DOC = (
    '"model": one grid of small maps, layers x heads (BertViz\'s model view); "head": per '
    "layer, the wordpieces twice joined by lines whose opacity is the weight, one colour per "
    'head (BertViz\'s head view); "map": per layer and head, its map labelled with the '
    "wordpieces."
)


class ModelHeatmapSpec(BaseModel):
    """Which pictures to draw of the layers and heads asked for."""

    model_config = ConfigDict(extra="forbid")

    views: list[ModelView] = Field(default=["model", "head"], description=_VIEWS_DOC)
    inline: bool = Field(
        default=False,
        description="Return the PNGs base64-encoded in the response instead of storing.",
    )

    @field_validator("views")
    @classmethod
    def _some_views(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("views must name at least one view")
        if len(set(v)) != len(v):
            raise ValueError("views must not repeat a view")
        return v


class ModelTokensRequest(BaseModel):
    """A text (or a pair of texts) through a real pretrained model, every attention computed by
    this service's kernel."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "model": "minilm-l6",
                    "text": "The cat sat on the mat because it was warm.",
                    "layers": [0, 5],
                    "heads": [0, 1, 2],
                    "heatmap": True,
                }
            ]
        },
    )

    model: ModelName = Field(
        description='The model (GET /v1/models lists them); without "model", /v1/tokens runs '
        "the random-embedding pipeline."
    )
    text: str = Field(max_length=MAX_TEXT_CHARS, description="The text, tokenised by the model.")
    text_pair: str | None = Field(
        None,
        max_length=MAX_TEXT_CHARS,
        description="A second text, encoded as BERT encodes pairs: [CLS] text [SEP] text_pair "
        "[SEP], token type 0 then 1.",
    )
    truncate: bool = Field(
        False,
        description="Cut an input over the model's 512 positions to 512 wordpieces (for a pair, "
        "the longer text first) instead of answering 422.",
    )
    layers: list[int] | None = Field(None, description="Layers to return (indices); null = all.")
    heads: list[int] | None = Field(None, description="Heads to return (indices); null = all.")
    need_weights: bool = Field(True, description="Return the attention weights.")
    heatmap: ModelHeatmapSpec | None = Field(
        None,
        description='true (the model and head views), or {"views": [...], "inline": bool}. '
        + _VIEWS_DOC,
    )
    encoding: Encoding = Field("list", description="Encoding of the result tensors.")

    @field_validator("heatmap", mode="before")
    @classmethod
    def _heatmap_spec(cls, value: Any) -> Any:
        return heatmap_flag(value, ModelHeatmapSpec, "{views, inline}")


class ModelImageRef(BaseModel):
    """One picture: stored (id, url of the PNG, svg_url of the same picture as SVG) or inline."""

    view: ModelView
    layer: int | None = Field(None, description='The layer ("head" and "map" views).')
    heads: list[int] = Field(description="The heads it shows.")
    id: str | None = None
    url: str | None = Field(None, description="Path of the PNG.")
    svg_url: str | None = Field(None, description="Path of the same picture as SVG.")
    png: str | None = Field(None, description="Base64 PNG (only when inline).")


class ModelTokensMeta(BaseModel):
    wordpieces: int = Field(description="Wordpieces of the whole input ([CLS]/[SEP] included).")
    truncated: bool = Field(description="The input was cut to the model's positions.")
    embedding_wordpieces: int = Field(description="Wordpieces the embedding was computed from.")
    embedding_truncated: bool
    num_layers: int
    num_heads: int
    elapsed_ms: float = Field(description="The whole forward pass (and the embedding's).")
    kernel_ms: float = Field(description="Of which in this service's attention kernel.")


class ModelTokensResponse(BaseModel):
    """The wordpieces, the attention weights (layers, heads, query, key), the embedding."""

    model: ModelName
    tokens: list[str] = Field(description="The wordpieces read, with [CLS] and [SEP].")
    token_type_ids: list[int]
    layers: list[int]
    heads: list[int]
    weights: Any = Field(
        None, description="(len(layers), len(heads), L, L) attention probabilities."
    )
    embedding: Any = Field(
        description="The sentence embedding as sentence-transformers computes it: the mean of "
        "the last hidden state over the wordpieces, L2-normalised (from the first 256 "
        "wordpieces at most; see notes)."
    )
    heatmaps: list[ModelImageRef]
    notes: list[str] = Field(description="What the answer leaves out or cuts, in words.")
    meta: ModelTokensMeta


class ModelInfo(BaseModel):
    name: str
    installed: bool = Field(description="Its package is installed, so it can run here.")
    loaded: bool = Field(description="Loaded in this process (it loads on first use).")
    package: str
    install: str = Field(description="The command that installs it.")
    source: str
    licence: str
    sha256: str = Field(description="Of model.safetensors, checked before the weights load.")
    error: str | None = Field(None, description="Why its files were refused, if they were.")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
