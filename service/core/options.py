"""The one options model: every attention option, shared by the Python API and every HTTP front.

Semantics (see README "Semantics"):
- scores s = scale * q.k; then softcap; then + ALiBi bias + float mask; then the boolean
  constraints (bool mask, causal, window, key_lengths) set -inf.
- Query row i is aligned to key position c = i + Lk - Lq ("bottom right") for the window,
  ALiBi and global tokens; `causal=True` means torch SDPA's "top_left" (j <= i).
- A row with no allowed key gives output 0 and weights 0 (`empty_rows="zero"`, as torch 2.13's
  scaled_dot_product_attention); torch.nn.MultiheadAttention gives NaN there, available as
  `empty_rows="nan"` (in multi-head attention a row empty in any head is NaN, like torch).

Over 400 lines on purpose: every option (masks, windows, block layouts, memory, multi-head
weights) with its meaning, which the API documents are built from, and its checks, side by side
in the one place a reader looks for what an option does.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from service.core.frameworks import is_array, is_bfloat16, to_numpy
from service.core.tensor_field import Tensor

CausalMode = Literal["top_left", "bottom_right"]

# List fields stop at their first invalid item: a list of a million bad items is one error, not
# a million (each costs time and memory to report).
FAIL_FAST = Field(fail_fast=True)
Ints = Annotated[list[int], FAIL_FAST]
Floats = Annotated[list[float], FAIL_FAST]
# The smallest softcap whose reciprocal float32 can hold: below it, scores / softcap is inf or
# NaN (and a softcap that rounds to 0 in float32 would switch the cap off).
SOFTCAP_MIN = float(2.0**-126)  # float32's smallest normal number, 1.18e-38


class Window(BaseModel):
    """Sliding window around the aligned diagonal c = i + Lk - Lq.

    Key j is allowed iff -left*dilation <= j - c <= right*dilation and (j - c) % dilation == 0;
    null means unbounded on that side. With dilation 1 this is FlashAttention's window_size.
    """

    model_config = ConfigDict(extra="forbid")

    left: int | None = Field(None, ge=0, description="Keys allowed before the diagonal.")
    right: int | None = Field(None, ge=0, description="Keys allowed after the diagonal.")
    dilation: int = Field(1, ge=1, le=1 << 20, description="Stride between allowed keys.")


class BlockPattern(BaseModel):
    """A common block layout, built by service.core.layouts.block_layout instead of drawn.

    The diagonal of query block qb is the key blocks covering the same positions (top-left
    aligned); "local" keeps those and `window` blocks on each side; "strided" adds every
    stride-th key block (Sparse Transformer's fixed columns); "bigbird" adds the first
    `global_blocks` blocks as global rows and columns and `random_blocks` random key blocks per
    query block and head, drawn from `seed`.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["local", "strided", "bigbird"]
    window: int = Field(1, ge=0, le=1 << 31, description="Key blocks on each side of the diagonal.")
    stride: int | None = Field(
        None, ge=1, le=1 << 31, description='"strided": keep every stride-th key block.'
    )
    global_blocks: int = Field(0, ge=0, le=1 << 31, description='"bigbird": global blocks.')
    random_blocks: int = Field(
        0, ge=0, le=1 << 31, description='"bigbird": random key blocks per query block and head.'
    )
    seed: int = Field(0, ge=0, description='"bigbird": seed of the random blocks.')

    @model_validator(mode="after")
    def _pattern_parameters(self) -> BlockPattern:
        if (self.stride is not None) != (self.kind == "strided"):
            raise ValueError('stride is required by "strided" and used by it alone')
        if self.kind != "bigbird" and (self.global_blocks or self.random_blocks):
            raise ValueError('global_blocks and random_blocks are used by "bigbird" alone')
        return self


class BlockMask(BaseModel):
    """Block-sparse attention (FlexAttention's BlockMask): query block qb = i // bq may see key
    block kb = j // bk only where layout[b, h, qb, kb] is true; a false block is never computed.
    Combines with every other option by AND. Block sizes need not divide the lengths."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    block_size: int | tuple[int, int] = Field(
        ..., description="bs, or [bq, bk] for query and key blocks of different sizes."
    )
    layout: Tensor | None = Field(
        None,
        description="Bool (or 0/1 integer) tensor broadcastable to (B, H, ceil(Lq/bq), "
        "ceil(Lk/bk)), H = query heads.",
    )
    pattern: BlockPattern | None = Field(
        None, description="A common layout by name instead of `layout` (exactly one of them)."
    )

    @field_validator("block_size")
    @classmethod
    def _positive_sizes(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        for n in (v,) if isinstance(v, int) else v:
            if not 1 <= n < 1 << 31:
                raise ValueError(f"block sizes must be between 1 and 2^31 - 1, got {n}")
        return v

    @model_validator(mode="after")
    def _one_layout(self) -> BlockMask:
        if (self.layout is None) == (self.pattern is None):
            raise ValueError("give exactly one of layout and pattern")
        return self

    @property
    def sizes(self) -> tuple[int, int]:
        """(bq, bk)."""
        bs = self.block_size
        return (bs, bs) if isinstance(bs, int) else (bs[0], bs[1])


# Lengths beyond this could not be positions of a sequence the kernel runs (native kMaxLen).
_MAX_LEN = (1 << 31) - 1


class MemorySpec(BaseModel):
    """Recurrent memory as a stream keeps it: the M most recent positions raw (Transformer-XL,
    Dai et al. 2019) and, before them, the C most recent compressed slots, each the elementwise
    mean or max of `rate` consecutive positions' keys and values (Compressive Transformer, Rae
    et al. 2019). C = 0 turns compression off."""

    model_config = ConfigDict(extra="forbid")

    length: int = Field(..., ge=0, le=_MAX_LEN, description="M: raw positions before a segment.")
    compressed: int = Field(
        0, ge=0, le=_MAX_LEN, description="C: compressed slots before the raw memory; 0 = none."
    )
    rate: int | None = Field(
        None,
        ge=1,
        le=_MAX_LEN,
        validate_default=True,
        description="c: positions pooled into one slot; required when compressed > 0 (it must "
        "divide length and the segments).",
    )
    pool: Literal["mean", "max"] = Field(
        "mean", description="How a slot pools its positions' keys and values, elementwise."
    )

    @field_validator("rate")
    @classmethod
    def _rate_divides_length(cls, v: int | None, info: ValidationInfo) -> int | None:
        if not info.data.get("compressed"):
            return v
        if v is None:
            raise ValueError("required when compressed > 0")
        length = info.data.get("length")
        if length is not None and length % v:
            raise ValueError(
                f"{v} must divide length {length} (slots pool whole positions of the raw memory)"
            )
        return v

    @property
    def slot_rate(self) -> int:
        """c, or 1 without compression (then nothing is pooled)."""
        return self.rate if self.compressed > 0 and self.rate is not None else 1


class Memory(MemorySpec):
    """The `memory` option: one sequence cut into segments of S; a query at p in segment
    s = p // S sees keys max(0, sS - M) <= j < sS (its raw memory), its own segment (j <= p when
    causal), and the C most recent slots t with (t + 1) c <= sS - M. See the README."""

    segment: int = Field(..., ge=1, le=_MAX_LEN, description="S: positions per segment.")

    @field_validator("segment")
    @classmethod
    def _rate_divides_segment(cls, v: int, info: ValidationInfo) -> int:
        rate = info.data.get("rate")
        if info.data.get("compressed") and rate and v % rate:
            raise ValueError(
                f"must be a multiple of rate {rate} (slots pool whole positions of each segment)"
            )
        return v


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
    key_lengths: Ints | None = Field(
        None, description="One length per batch item; keys at index >= length are padding."
    )
    window: Window | None = None
    global_tokens: Ints | None = Field(
        None,
        description="Key positions that every query may attend to, and whose (aligned) query "
        "rows ignore the window (Longformer).",
    )
    alibi_slopes: Floats | bool | None = Field(
        None,
        description="One slope per query head, or true for the standard 2^(-8(h+1)/H); adds "
        "-slope*|i + Lk - Lq - j| to the scores.",
    )
    block_mask: BlockMask | None = Field(
        None, description="Block-sparse layout: only the kept (query block, key block) pairs."
    )
    cu_seqlens: Ints | None = Field(
        None,
        description="Packed variable-length documents (flash-attn's cu_seqlens): offsets "
        "0 = c0 <= c1 <= ... = L; the batch axis is 1 and document d holds positions "
        "[c_d, c_d+1) of q, k and v. A query sees only keys of its own document; causal, the "
        "window and ALiBi align per document. Not with key_lengths or global_tokens.",
    )
    cu_seqlens_q: Ints | None = Field(
        None,
        description="Packed documents with other key offsets (cross attention): the "
        "queries' offsets, with cu_seqlens_k.",
    )
    cu_seqlens_k: Ints | None = Field(
        None, description="The keys' offsets, with cu_seqlens_q (same number of documents)."
    )
    softcap: float | None = Field(
        None, gt=0, description="Scores become softcap*tanh(scores/softcap)."
    )
    empty_rows: Literal["zero", "nan"] = Field(
        "zero",
        description='A row with no allowed key: "zero" gives output 0 and weights 0 (like torch '
        'SDPA); "nan" gives NaN (like torch.nn.MultiheadAttention).',
    )

    @field_validator("*", mode="before")
    @classmethod
    def _arrays_as_lists(cls, v: Any, info: ValidationInfo) -> Any:
        """An array of any library given for a list option (key_lengths, global_tokens, ...,
        in this model or a subclass) becomes a list; tensor fields read arrays themselves."""
        if not (isinstance(v, np.ndarray) or is_array(v)) or info.field_name is None:
            return v
        if "list[" not in str(cls.model_fields[info.field_name].annotation):
            return v
        arr = to_numpy(v)
        return (arr.astype(np.float32) if is_bfloat16(arr.dtype) else arr).tolist()

    @field_validator("scale", "softcap")
    @classmethod
    def _finite(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be a finite number")
        if info.field_name == "softcap" and v is not None and v < SOFTCAP_MIN:
            raise ValueError(
                f"{v:.3g} is below {SOFTCAP_MIN:.3g}, float32's smallest normal number: "
                "scores / softcap would overflow (or the cap round to 0 and vanish)"
            )
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


_WEIGHTS_ROWS_DOC = (
    "Query rows (distinct, in [0, Lq), any order) whose probabilities and log-sum-exp to "
    "return, in this order: weights (.., H, len(rows), Lk) from the tiled kernel, without the "
    "Lq x Lk matrix. Implies the weights; with cu_seqlens a row spans the packed keys (0 outside "
    "its document)."
)


class AttentionOptions(MaskingOptions):
    """Options of scaled dot-product attention (the Python API and /v1/attention)."""

    return_weights: bool = Field(
        False, description="Also return the probabilities (B, H, Lq, Lk) and the row log-sum-exp."
    )
    weights_rows: Ints | None = Field(None, description=_WEIGHTS_ROWS_DOC)
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
    memory: Memory | None = Field(
        None,
        description="Recurrent memory over one sequence (Lq = Lk): segments of `segment` "
        "positions, each seeing its `length` raw positions before it and `compressed` slots "
        "pooled by `rate` before those; with weights, slot_weights covers the slots.",
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

    def active_options(self) -> dict[str, tuple[str | int, ...]]:
        """The options that are set (not at their no-op default), each with the loc an error
        about it names: the option, or for a window the part that matters (its dilation when
        above 1, else the bound that is set)."""
        on = {
            "scale": self.scale is not None,
            "causal": self.causal_mode is not None,
            "mask": self.mask is not None,
            "key_lengths": self.key_lengths is not None,
            "window": self.window is not None,
            "global_tokens": bool(self.global_tokens),
            "alibi_slopes": self.alibi_slopes not in (None, False),
            "softcap": self.softcap is not None,
            "return_weights": self.return_weights,
            "compare": self.compare,
            "num_features": self.num_features is not None,
            "seed": self.seed is not None,
            "linformer_k": self.linformer_k is not None,
            "out_dtype": self.out_dtype != "float32",
            "precision": self.precision != "auto",
            "block_mask": self.block_mask is not None,
            "cu_seqlens": self.cu_seqlens is not None,
            "cu_seqlens_q": self.cu_seqlens_q is not None,
            "cu_seqlens_k": self.cu_seqlens_k is not None,
            "weights_rows": self.weights_rows is not None,
            "memory": self.memory is not None,
        }
        active: dict[str, tuple[str | int, ...]] = {n: (n,) for n, is_on in on.items() if is_on}
        if self.window is not None:
            w = self.window
            parts = (
                ("dilation", w.dilation > 1),
                ("left", w.left is not None),
                ("right", w.right is not None),
            )
            active["window"] = ("window", *[name for name, is_on in parts if is_on][:1])
        return active


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


class MultiheadMasking(MaskingOptions):
    """What `multihead_attention` takes as `options` (or keywords) beside its own arguments:
    the masking options and weights_rows."""

    weights_rows: Ints | None = Field(None, description=_WEIGHTS_ROWS_DOC)


class MultiheadOptions(MultiheadMasking):
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
