"""The one options model: every attention option, shared by the Python API and every HTTP front.

Semantics (see README "Semantics"):
- scores s = scale * q.k; then softcap; then + ALiBi bias + float mask; then the boolean
  constraints (bool mask, causal, window, key_lengths) set -inf.
- Query row i is aligned to key position c = i + Lk - Lq ("bottom right") for the window,
  ALiBi and global tokens; `causal=True` means torch SDPA's "top_left" (j <= i).
- A row with no allowed key gives output 0 and weights 0 (`empty_rows="zero"`, as torch 2.13's
  scaled_dot_product_attention); torch.nn.MultiheadAttention gives NaN there, available as
  `empty_rows="nan"` (in multi-head attention a row empty in any head is NaN, like torch).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from service.core.tensor_field import Tensor

CausalMode = Literal["top_left", "bottom_right"]


class Window(BaseModel):
    """Sliding window around the aligned diagonal c = i + Lk - Lq.

    Key j is allowed iff -left*dilation <= j - c <= right*dilation and (j - c) % dilation == 0;
    null means unbounded on that side. With dilation 1 this is FlashAttention's window_size.
    """

    model_config = ConfigDict(extra="forbid")

    left: int | None = Field(None, ge=0, description="Keys allowed before the diagonal.")
    right: int | None = Field(None, ge=0, description="Keys allowed after the diagonal.")
    dilation: int = Field(1, ge=1, le=1 << 20, description="Stride between allowed keys.")


class MaskingOptions(BaseModel):
    """Which keys each query may see, and how scores are formed."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    scale: float | None = Field(None, description="Score scale; default 1/sqrt(D).")
    causal: bool | CausalMode = Field(
        False,
        description='true = "top_left" (torch SDPA: j <= i); "bottom_right" = FlashAttention '
        "(j <= i + Lk - Lq).",
    )
    mask: Tensor | None = Field(
        None,
        description="Bool (see mask_convention) or float (added to the scores), broadcastable "
        "to (B, H, Lq, Lk).",
    )
    mask_convention: Literal["attend", "ignore"] = Field(
        "attend",
        description='For a bool mask: "attend" = True means attend (torch SDPA); "ignore" = True '
        "means masked out (nn.MultiheadAttention's attn_mask / key_padding_mask).",
    )
    key_lengths: list[int] | None = Field(
        None, description="One length per batch item; keys at index >= length are padding."
    )
    window: Window | None = None
    global_tokens: list[int] | None = Field(
        None,
        description="Key positions that every query may attend to, and whose (aligned) query "
        "rows ignore the window (Longformer).",
    )
    alibi_slopes: list[float] | bool | None = Field(
        None,
        description="One slope per query head, or true for the standard 2^(-8(h+1)/H); adds "
        "-slope*|i + Lk - Lq - j| to the scores.",
    )
    softcap: float | None = Field(
        None, gt=0, description="Scores become softcap*tanh(scores/softcap)."
    )
    empty_rows: Literal["zero", "nan"] = Field(
        "zero",
        description='A row with no allowed key: "zero" gives output 0 and weights 0 (like torch '
        'SDPA); "nan" gives NaN (like torch.nn.MultiheadAttention).',
    )

    @field_validator("scale", "softcap")
    @classmethod
    def _finite(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be a finite number")
        return v

    @field_validator("key_lengths")
    @classmethod
    def _nonnegative_lengths(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(n < 0 for n in v):
            raise ValueError("key_lengths must be >= 0")
        return v

    @field_validator("global_tokens")
    @classmethod
    def _sorted_tokens(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(t < 0 for t in v):
            raise ValueError("global_tokens must be >= 0")
        return sorted(set(v))

    @field_validator("alibi_slopes")
    @classmethod
    def _finite_slopes(cls, v: list[float] | bool | None) -> list[float] | bool | None:
        if isinstance(v, list) and not all(math.isfinite(s) for s in v):
            raise ValueError("alibi_slopes must be finite numbers")
        return v

    @property
    def causal_mode(self) -> CausalMode | None:
        """The explicit causal alignment, or None when not causal."""
        if self.causal is True:
            return "top_left"
        return self.causal or None


class AttentionOptions(MaskingOptions):
    """Options of scaled dot-product attention (the Python API and /v1/attention)."""

    return_weights: bool = Field(
        False, description="Also return the probabilities (B, H, Lq, Lk) and the row log-sum-exp."
    )
    out_dtype: Literal["float32", "input"] = Field(
        "float32",
        description="The output's dtype: float32, or \"input\" for q's dtype when q, k and v are "
        "all float16 or all bfloat16 (the weights and lse stay float32).",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description='How Q.K^T and P.V are formed: "auto" = bf16 dot products for bfloat16 '
        "inputs on CPUs with AVX512_BF16 (about twice float32's speed; only the probabilities "
        'are rounded), float32 otherwise (float16 keeps its precision); "fp32" = float32 '
        'always (16-bit inputs widened exactly); "bf16" = bf16 numerics always (inputs rounded '
        "to bf16, products summed in float32; emulated where the CPU lacks the instruction). "
        "The softmax statistics are float32 in every mode.",
    )
    # Linear-time approximations (service/core/approx/). Method parameters default to null so
    # that one given to a method that does not use it is reported rather than ignored.
    method: Literal["exact", "linear", "performer", "linformer"] = Field(
        "exact",
        description='"linear" = elu(x)+1 features (Katharopoulos et al.); "performer" = FAVOR+ '
        'positive orthogonal random features; "linformer" = keys and values projected along the '
        "sequence. Each supports a subset of the options (an unsupported one is an error).",
    )
    num_features: int | None = Field(
        None, ge=1, le=16384, description="performer: random features; null = ceil(D ln D)."
    )
    seed: int | None = Field(
        None, ge=0, description="performer/linformer: seed of the random features; null = 0."
    )
    linformer_k: int | None = Field(
        None, ge=1, le=16384, description="linformer: projected length; null = min(Lk, 256)."
    )
    compare: bool = Field(
        False,
        description="Also run exact attention on the same input and report the approximation's "
        "error and its implied attention map (pooled when long).",
    )


class MultiheadWeights(BaseModel):
    """Projection weights of multi-head attention, in torch's (out_features, in_features) layout.

    With E = embed_dim, H query heads, Hkv kv heads and head_dim = E / H: q_proj (E, E),
    k_proj (Hkv*head_dim, kdim), v_proj (Hkv*head_dim, vdim), out_proj (E, E). With
    grouped-query heads (Hkv < H) the k/v projections are smaller than torch's.
    A missing bias means no bias.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    q_proj: Tensor
    k_proj: Tensor
    v_proj: Tensor
    out_proj: Tensor
    q_bias: Tensor | None = None
    k_bias: Tensor | None = None
    v_bias: Tensor | None = None
    out_bias: Tensor | None = None


class MultiheadOptions(MaskingOptions):
    """Options of multi-head attention (the Python API and /v1/multihead)."""

    num_heads: int = Field(..., ge=1, description="Query heads H; embed_dim must divide by it.")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention); null = num_heads."
    )
    weights: MultiheadWeights | None = Field(
        None, description="Projection weights; null = Xavier-uniform from `seed`, zero biases."
    )
    seed: int = Field(0, ge=0, description="Seed of the Xavier-uniform init when no weights.")
    average_weights: bool = Field(
        True, description="Average the returned weights over heads (like torch)."
    )
    need_weights: bool = Field(
        False, description="Also return the weights and the per-head row log-sum-exp."
    )
