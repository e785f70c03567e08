"""`multihead_attention`: torch.nn.MultiheadAttention(batch_first=True) with grouped-query heads,
projections and attention in one native call."""

from __future__ import annotations

import math
from typing import Any, cast

import numpy as np
from pydantic import ValidationError

from service import _native
from service.core.errors import InputError
from service.core.inputs import (
    F32_SAFE,
    ArrayLike,
    absmax,
    check_magnitude,
    checked_float32,
    input_error,
    parse_options,
    thread_count,
    to_output,
)
from service.core.masking import native_masking
from service.core.native_call import call_native
from service.core.options import MaskingOptions, MultiheadMasking, MultiheadWeights
from service.core.results import MultiheadResult
from service.core.weights import (
    check_seed,
    checked_arrays,
    head_layout,
    init_multihead_weights,
    parameter_count,
)


def _weights_model(weights: MultiheadWeights | dict[str, Any] | None) -> MultiheadWeights | None:
    if weights is None or isinstance(weights, MultiheadWeights):
        return weights
    if not isinstance(weights, dict):
        raise InputError("weights", f"expected MultiheadWeights or a dict, got {type(weights)}")
    try:
        return MultiheadWeights.model_validate(weights)
    except ValidationError as exc:
        raise input_error(exc, ("weights",)) from None


# The native call's order of the weights and biases.
_WEIGHT_ORDER = (
    "q_proj", "k_proj", "v_proj", "out_proj", "q_bias", "k_bias", "v_bias", "out_bias",
)  # fmt: skip


def _values_in_range(w: dict[str, Any], v_max: float, lk: int) -> dict[str, Any]:
    """The weights to run with. The kernel sums up to Lk projected values before dividing by
    the weights' total; where that could overflow float32, the value projection is scaled down
    by a power of two and the output projection up by the same (exact; in range, since
    e * v_max * max|out_proj| was checked)."""
    if v_max * max(lk, 1) <= F32_SAFE:
        return w
    e = math.frexp(v_max)[1]
    bias = w["v_bias"]
    return {
        **w,
        "v_proj": np.ldexp(w["v_proj"], -e),
        "v_bias": None if bias is None else np.ldexp(bias, -e),
        "out_proj": np.ldexp(w["out_proj"], e),
    }


def multihead_attention(
    query: ArrayLike,
    key: ArrayLike | None = None,
    value: ArrayLike | None = None,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    weights: MultiheadWeights | dict[str, Any] | None = None,
    seed: int = 0,
    average_weights: bool = True,
    need_weights: bool = False,
    options: MaskingOptions | None = None,
    num_threads: int | None = None,
    **option_kwargs: Any,
) -> MultiheadResult:
    """torch.nn.MultiheadAttention(batch_first=True) with grouped-query heads, natively.

    query (B, Lq, E) or (Lq, E); key (B, Lk, kdim) defaults to query; value (B, Lk, vdim)
    defaults to key. weights None -> Xavier-uniform from `seed` with zero biases. Masking
    options as in `attention` with H = num_heads: torch's key_padding_mask is key_lengths (or
    a (B, 1, 1, Lk) bool mask with mask_convention="ignore"); torch's attn_mask is mask with
    mask_convention="ignore" (a (B*H, Lq, Lk) one reshaped to (B, H, Lq, Lk)).
    weights_rows (in `options` or as a keyword) returns the weights and lse of those query rows
    only, (B, [H,] len(rows), Lk), and implies need_weights.
    """
    opts = parse_options(MultiheadMasking, options, option_kwargs)
    rows = opts.weights_rows
    need_weights = need_weights or rows is not None
    threads = thread_count(num_threads)
    key_name = "query" if key is None else "key"
    value_name = key_name if value is None else "value"
    # Each tensor checked (and converted) once, with its max|x|; a defaulted one is the other's.
    x, x_peak = checked_float32("query", query)
    kx, k_peak = (x, x_peak) if key is None else checked_float32("key", key)
    vx, v_peak = (kx, k_peak) if value is None else checked_float32("value", value)
    if x.ndim not in (2, 3):
        raise InputError("query", f"expected (B, Lq, E) or (Lq, E); got {x.ndim} dimensions")
    for name, a in (("key", kx), ("value", vx)):
        if a.ndim != x.ndim:
            raise InputError(name, f"has {a.ndim} dimensions but query has {x.ndim}; use one rank")
    batched = x.ndim == 3
    if not batched:
        x, kx, vx = x[None], kx[None], vx[None]
    b, lq, e = x.shape
    bk, lk, kdim = kx.shape
    bv, lv, vdim = vx.shape
    if bk != b or bv != b:
        raise InputError("key" if bk != b else "value", f"batch {bk if bk != b else bv} != {b}")
    if lv != lk:
        raise InputError("value", f"has {lv} positions but key has {lk}")
    for name, dim in (("query", e), ("key", kdim), ("value", vdim)):
        if dim == 0:
            raise InputError(name, "feature dimension is 0 (empty tensor)")
    hkv, head_dim = head_layout(e, num_heads, num_kv_heads)
    check_seed(seed)
    used = _weights_model(weights) or init_multihead_weights(e, num_heads, hkv, kdim, vdim, seed)
    w = checked_arrays(used, e, hkv * head_dim, kdim, vdim)
    kw = native_masking(opts, (b, num_heads, lq, lk))
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(head_dim)
    # Bounds of the projections and scores, from the largest magnitudes involved.
    q_max = e * x_peak * absmax(w["q_proj"]) + absmax(w["q_bias"])
    k_max = kdim * k_peak * absmax(w["k_proj"]) + absmax(w["k_bias"])
    v_max = vdim * v_peak * absmax(w["v_proj"]) + absmax(w["v_bias"])
    out_max = e * v_max * absmax(w["out_proj"]) + absmax(w["out_bias"])
    # Each bound names the tensor that drives it (one defaulted to another names that one).
    check_magnitude("query", q_max, "its projection")
    check_magnitude(key_name, k_max, "the key projection")
    check_magnitude(value_name, v_max, "the value projection")
    check_magnitude(value_name, out_max, "the output projection of the values")
    check_magnitude("query", abs(scale) * head_dim * q_max * k_max, "scale * q.k")
    nw = _values_in_range(w, v_max, lk)
    (out, lse, probs), elapsed = call_native(
        _native.multihead,
        x,
        kx,
        vx,
        *(nw[name] for name in _WEIGHT_ORDER),
        num_heads=num_heads,
        num_kv_heads=hkv,
        scale=float(scale),
        return_weights=need_weights,
        weights_rows=None if rows is None else np.asarray(rows, dtype=np.int64),
        num_threads=threads,
        **kw,
    )
    if opts.empty_rows == "nan":
        empty = np.isneginf(lse)  # (B, H, Lq); out_proj mixes heads, so any empty head -> NaN row
        out[empty.any(axis=1)] = np.nan
        if probs is not None:
            probs[empty if rows is None else empty[..., rows]] = np.nan
    if rows is not None:
        lse = lse[:, :, rows]  # the rows asked for, in their order, as the weights
    if need_weights and average_weights:
        probs = probs.mean(axis=1)
    if not batched:
        out, lse = out[0], lse[0]
        probs = None if probs is None else probs[0]
    kv_dim = hkv * head_dim
    flops = (
        2 * b * lq * e * e * 2  # q and out projections
        + 2 * b * lk * kv_dim * (kdim + vdim)  # k and v projections
        + 4 * b * num_heads * lq * lk * head_dim  # scores and weighted values
    )
    return MultiheadResult(
        output=to_output(out, query),
        weights=to_output(probs, query) if need_weights else None,
        lse=to_output(lse, query) if need_weights else None,
        param_count=parameter_count(w),
        elapsed_ms=elapsed,
        flops=flops,
        weights_used=MultiheadWeights.model_construct(**cast(dict[str, Any], w)),
    )
