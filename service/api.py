"""The Python API: `attention` and `multihead_attention` on numpy arrays or torch tensors.

This layer normalises inputs (rank, dtype, torch -> numpy, contiguity), checks them so that every
problem is an InputError naming the argument, turns the options model into the native module's
arguments, and converts the results back (torch in -> torch out, q's rank). torch is never
imported unless the caller passed a torch tensor, so the service runs without it.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from service import _native
from service.cancel import Cancelled, checkpoint, current
from service.errors import InputError
from service.options import (
    AttentionOptions,
    MaskingOptions,
    MultiheadOptions,
    MultiheadWeights,
    Window,
)
from service.weights import (
    check_seed,
    checked_arrays,
    head_layout,
    init_multihead_weights,
    parameter_count,
)

# A numpy array or a torch tensor (torch is not a dependency, so no stricter annotation).
ArrayLike = Any

_CAUSAL_CODES = {None: 0, "top_left": 1, "bottom_right": 2}
# pydantic puts union tags ("bool", "list[float]", "literal[...]") into error locations; these
# are dropped so that a loc names fields only.
_TYPE_TAGS = frozenset({"bool", "int", "float", "str", "none"})
_FIELD_NAMES = frozenset(
    set(MultiheadOptions.model_fields)
    | set(AttentionOptions.model_fields)
    | set(Window.model_fields)
    | set(MultiheadWeights.model_fields)
)
_MAX_THREADS = 1024
# Bound on |scores| (and projections) that the float32 kernel can form without overflowing to
# inf, where inf - inf would give NaN; a little headroom below float32's max of 3.4e38.
_F32_SAFE = 1e37

ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(frozen=True)
class AttentionResult:
    """Result of `attention`.

    output: (.., Hq, Lq, Dv) with q's rank. weights: (.., Hq, Lq, Lk) probabilities and
    lse: (.., Hq, Lq) natural-log sum of exp(scores) over allowed keys, both only when
    return_weights. elapsed_ms: native compute time. flops: 2*B*Hq*Lq*Lk*(D + Dv), the dense
    count of the two matrix products (masked-out tiles the kernel skips are still counted).
    method: "exact", or the approximation used (service/approx.py, which also fills
    `comparison` when asked to compare with exact attention).
    """

    output: ArrayLike
    weights: ArrayLike | None
    lse: ArrayLike | None
    elapsed_ms: float
    flops: int
    method: str = "exact"
    comparison: dict[str, Any] | None = None


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


# ---------------------------------------------------------------------------------------------
# Input normalisation


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch"


def _as_float32(name: str, x: Any) -> np.ndarray:
    """A C-contiguous, finite float32 copy (or view) of a float array or tensor."""
    if _is_torch(x):
        if x.is_complex() or not x.is_floating_point():
            raise InputError(name, f"unsupported dtype {x.dtype}; expected a floating-point tensor")
        try:
            arr = x.detach().cpu().float().contiguous().numpy()
        except (RuntimeError, TypeError) as exc:  # e.g. sparse or meta tensors
            raise InputError(name, f"cannot read this tensor: {exc}") from None
    else:
        try:
            arr = np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise InputError(name, f"not an array: {exc}") from None
        if arr.dtype.kind != "f":
            raise InputError(
                name, f"unsupported dtype {arr.dtype}; expected a floating-point array"
            )
        with np.errstate(over="ignore"):  # float64 beyond float32's range is reported below
            arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(name, "contains NaN or Inf (after conversion to float32)")
    return arr


def _to_output(arr: np.ndarray | None, like: Any) -> ArrayLike | None:
    """Answer in the caller's type: torch tensor (on the input's device) or numpy array."""
    if arr is None or not _is_torch(like):
        return arr
    import torch  # only reached when the caller already uses torch

    return torch.from_numpy(np.ascontiguousarray(arr)).to(like.device)


def _num_threads(num_threads: int | None) -> int:
    """Native thread count: 0 means the library default."""
    if num_threads is None:
        return 0
    try:
        n = operator.index(num_threads)
    except TypeError:
        raise InputError(
            "num_threads", f"must be an integer or None, got {num_threads!r}"
        ) from None
    if isinstance(num_threads, bool) or not 1 <= n <= _MAX_THREADS:
        raise InputError(
            "num_threads", f"must be between 1 and {_MAX_THREADS}, got {num_threads!r}"
        )
    return n


def _absmax(a: np.ndarray | None) -> float:
    """max |a| without a temporary array (0 for None or empty)."""
    return 0.0 if a is None or a.size == 0 else float(max(-a.min(), a.max()))


def _check_magnitude(loc: str | tuple[str | int, ...], bound: float, what: str) -> None:
    if not bound <= _F32_SAFE:
        raise InputError(
            loc, f"values too large: {what} could reach {bound:.3g}, beyond float32's range"
        )


def _as_4d(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """(Lq, D) / (Hq, Lq, D) / (B, Hq, Lq, D) -> 4-D views, with every shape rule checked."""
    if q.ndim not in (2, 3, 4):
        raise InputError(
            "q", f"expected (Lq, D), (Hq, Lq, D) or (B, Hq, Lq, D); got {q.ndim} dimensions"
        )
    for name, a in (("k", k), ("v", v)):
        if a.ndim != q.ndim:
            raise InputError(name, f"has {a.ndim} dimensions but q has {q.ndim}; use one rank")
    pad = (1,) * (4 - q.ndim)
    q4, k4, v4 = (a.reshape(pad + a.shape) for a in (q, k, v))
    b, hq, _, d = q4.shape
    bk, hkv, lk, dk = k4.shape
    bv, hv, lv, dv = v4.shape
    if d == 0:
        raise InputError("q", "head dim D is 0 (empty tensor)")
    if dk != d:
        raise InputError("k", f"head dim {dk} differs from q's {d}")
    if dv == 0:
        raise InputError("v", "value dim Dv is 0 (empty tensor)")
    if bk != b or bv != b:
        raise InputError("k" if bk != b else "v", f"batch {bk if bk != b else bv} != q's {b}")
    if hv != hkv:
        raise InputError("v", f"has {hv} heads but k has {hkv}")
    if lv != lk:
        raise InputError("v", f"has {lv} keys but k has {lk}")
    if (hkv == 0 and hq != 0) or (hkv and hq % hkv):
        raise InputError("k", f"q's {hq} heads are not a multiple of k's {hkv} heads")
    return q4, k4, v4


# ---------------------------------------------------------------------------------------------
# Options


def _input_error(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> InputError:
    """The first pydantic error as an InputError; union tags are dropped from its loc."""
    errors = exc.errors(include_url=False)

    def is_tag(part: str | int) -> bool:
        return (
            isinstance(part, str)
            and part not in _FIELD_NAMES
            and ("[" in part or part in _TYPE_TAGS)
        )

    def clean(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
        return tuple(p for i, p in enumerate(loc) if i == 0 or not is_tag(p))

    loc = clean(errors[0]["loc"])
    msgs = dict.fromkeys(e["msg"] for e in errors if clean(e["loc"]) == loc)
    return InputError(prefix + loc or ("options",), "; ".join(msgs))


_LIST_FIELDS = frozenset({"key_lengths", "global_tokens", "alibi_slopes"})


def _plain(name: str, value: Any) -> Any:
    """numpy arrays and torch tensors given for the list options (key_lengths, ...) -> lists."""
    if name in _LIST_FIELDS and (isinstance(value, np.ndarray) or _is_torch(value)):
        return value.tolist()
    return value


def _parse_options(
    model: type[ModelT], options: BaseModel | dict[str, Any] | None, overrides: dict[str, Any]
) -> ModelT:
    """Validate `options` with keyword overrides on top; only `model`'s own fields are taken."""
    if options is None:
        base: dict[str, Any] = {}
    elif isinstance(options, BaseModel):
        base = {f: getattr(options, f) for f in options.model_fields_set if f in model.model_fields}
    elif isinstance(options, dict):
        base = dict(options)
    else:
        raise InputError("options", f"expected {model.__name__} or a dict, got {type(options)}")
    data = {**base, **{name: _plain(name, v) for name, v in overrides.items()}}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _input_error(exc) from None


def _mask_4d(mask: np.ndarray, convention: str, shape: tuple[int, int, int, int]) -> np.ndarray:
    """The mask as bool (True = attend) or float32, broadcast to `shape` as a strided view."""
    kind = mask.dtype.kind
    if kind == "b":
        m = ~mask if convention == "ignore" else mask
    elif kind == "f":
        with np.errstate(over="ignore"):  # huge negatives becoming -inf is what they mean
            m = mask.astype(np.float32, copy=False)
        if np.isnan(m).any():
            raise InputError("mask", "float mask contains NaN")
        if m.size and m.max() > _F32_SAFE:  # +inf, or near it: scores would overflow
            raise InputError(
                "mask",
                f"float mask holds {m.max():.3g}; values above {_F32_SAFE:.0e} overflow "
                "the scores (use -inf to exclude a key)",
            )
    elif kind in "iu":
        raise InputError(
            "mask",
            f"integer masks are ambiguous (dtype {mask.dtype}); pass a bool mask (True = attend, "
            "or masked out with mask_convention='ignore') or a float mask added to the scores",
        )
    else:
        raise InputError("mask", f"unsupported dtype {mask.dtype}; expected bool or float")
    if not m.flags.aligned or any(s < 0 for s in m.strides):
        m = m.copy()  # the kernel reads through strides, but only non-negative aligned ones
    try:
        return np.broadcast_to(m, shape)
    except ValueError:
        raise InputError(
            "mask",
            f"shape {tuple(mask.shape)} is not broadcastable to (B, H, Lq, Lk) = {shape}",
        ) from None


def _native_masking(opts: MaskingOptions, shape: tuple[int, int, int, int]) -> dict[str, Any]:
    """Keyword arguments of the native kernels for the masking options, checked against shape."""
    b, h, lq, lk = shape
    for name in ("scale", "softcap"):
        _check_magnitude(name, abs(getattr(opts, name) or 0.0), name)
    kw: dict[str, Any] = {
        "causal": _CAUSAL_CODES[opts.causal_mode],
        "softcap": float(opts.softcap or 0.0),
    }
    if opts.mask is not None:
        kw["mask"] = _mask_4d(opts.mask, opts.mask_convention, shape)
    if opts.key_lengths is not None:
        if len(opts.key_lengths) != b:
            raise InputError(
                "key_lengths",
                f"has {len(opts.key_lengths)} entries; expected one per batch item ({b})",
            )
        for i, n in enumerate(opts.key_lengths):
            if n > lk:
                raise InputError(("key_lengths", i), f"length {n} exceeds Lk={lk}")
        kw["key_lengths"] = np.asarray(opts.key_lengths, dtype=np.int64)
    if opts.window is not None:
        w = opts.window
        # Bounds beyond every possible offset mean "unbounded"; clamping keeps the native
        # products left*dilation small. Offsets j - c lie in [-(Lk-1), Lq-1].
        kw["dilation"] = w.dilation
        if w.left is not None:
            kw["window_left"] = min(w.left, -(-max(lk - 1, 0) // w.dilation))
        if w.right is not None:
            kw["window_right"] = min(w.right, -(-max(lq - 1, 0) // w.dilation))
    if opts.global_tokens:
        if opts.global_tokens[-1] >= lk:
            raise InputError(
                "global_tokens", f"position {opts.global_tokens[-1]} outside [0, {lk})"
            )
        kw["global_tokens"] = np.asarray(opts.global_tokens, dtype=np.int64)
    slopes = opts.alibi_slopes
    if slopes is True:
        kw["alibi_slopes"] = (2.0 ** (-8.0 * np.arange(1, h + 1) / h)).astype(np.float32)
    elif isinstance(slopes, list):
        if len(slopes) != h:
            raise InputError(
                "alibi_slopes", f"has {len(slopes)} slopes; expected one per head ({h})"
            )
        for i, slope in enumerate(slopes):
            _check_magnitude(("alibi_slopes", i), abs(slope) * max(lq, lk), "the ALiBi bias")
        kw["alibi_slopes"] = np.asarray(slopes, dtype=np.float32)
    return kw


def _call_native(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run a native kernel; its ValueErrors become InputErrors. Returns (result, elapsed ms)."""
    checkpoint()  # an abandoned HTTP job stops here instead of starting the kernel
    token = current()
    if token is not None:  # and a running kernel stops once the token is cancelled
        kwargs["cancel"] = token.flag
    start = time.perf_counter()
    try:
        result = fn(*args, **kwargs)
    except _native.Cancelled:
        raise Cancelled(token.reason if token is not None else "cancelled") from None
    except ValueError as exc:
        head, sep, rest = str(exc).partition(": ")
        loc = head if sep and head.isidentifier() else "input"
        raise InputError(loc, rest if loc == head else str(exc)) from None
    return result, (time.perf_counter() - start) * 1e3


# ---------------------------------------------------------------------------------------------
# Public functions


def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    options: AttentionOptions | None = None,
    *,
    num_threads: int | None = None,
    **option_kwargs: Any,
) -> AttentionResult:
    """Exact scaled dot-product attention (see service.options for every option's meaning).

    q (Lq, D), (Hq, Lq, D) or (B, Hq, Lq, D); k (.., Hkv, Lk, D); v (.., Hkv, Lk, Dv), one rank
    for all three; numpy arrays or torch tensors of any float dtype (computed in float32).
    Keyword options override those in `options`. A rank-2/3 q is treated as B = 1 (and Hq = 1),
    so a mask is broadcast right-aligned against (B, Hq, Lq, Lk) as numpy and torch would.
    """
    opts = _parse_options(AttentionOptions, options, option_kwargs)
    threads = _num_threads(num_threads)
    arrays = [_as_float32(name, x) for name, x in (("q", q), ("k", k), ("v", v))]
    rank = arrays[0].ndim
    q4, k4, v4 = _as_4d(*arrays)
    b, hq, lq, d = q4.shape
    lk, dv = k4.shape[2], v4.shape[3]
    kw = _native_masking(opts, (b, hq, lq, lk))
    from service import approx  # the approximations live there; imported late, as they use us

    approx.check_options(opts)  # options the chosen method does not support are errors
    if opts.method != "exact":
        return approx.attention_result(q, q4, k4, v4, opts)
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(d)
    _check_magnitude("q", abs(scale) * d * _absmax(q4) * _absmax(k4), "scale * q.k")
    (out, lse, weights), elapsed = _call_native(
        _native.attention,
        q4,
        k4,
        v4,
        scale=float(scale),
        return_weights=opts.return_weights,
        num_threads=threads,
        **kw,
    )
    if opts.empty_rows == "nan":
        empty = np.isneginf(lse)
        out[empty] = np.nan
        if weights is not None:
            weights[empty] = np.nan
    lead = (b, hq)[4 - rank :]
    return AttentionResult(
        output=_to_output(out.reshape(lead + (lq, dv)), q),
        weights=_to_output(weights.reshape(lead + (lq, lk)), q) if opts.return_weights else None,
        lse=_to_output(lse.reshape(lead + (lq,)), q) if opts.return_weights else None,
        elapsed_ms=elapsed,
        flops=2 * b * hq * lq * lk * (d + dv),
    )


def _weights_model(weights: MultiheadWeights | dict[str, Any] | None) -> MultiheadWeights | None:
    if weights is None or isinstance(weights, MultiheadWeights):
        return weights
    if not isinstance(weights, dict):
        raise InputError("weights", f"expected MultiheadWeights or a dict, got {type(weights)}")
    try:
        return MultiheadWeights.model_validate(weights)
    except ValidationError as exc:
        raise _input_error(exc, ("weights",)) from None


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
    """
    opts = _parse_options(MaskingOptions, options, option_kwargs)
    threads = _num_threads(num_threads)
    key = query if key is None else key
    value = key if value is None else value
    x, kx, vx = (_as_float32(n, t) for n, t in (("query", query), ("key", key), ("value", value)))
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
    kw = _native_masking(opts, (b, num_heads, lq, lk))
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(head_dim)
    # Bounds of the projections and scores, from the largest magnitudes involved.
    q_max = e * _absmax(x) * _absmax(w["q_proj"]) + _absmax(w["q_bias"])
    k_max = kdim * _absmax(kx) * _absmax(w["k_proj"]) + _absmax(w["k_bias"])
    v_max = vdim * _absmax(vx) * _absmax(w["v_proj"]) + _absmax(w["v_bias"])
    out_max = e * v_max * _absmax(w["out_proj"]) + _absmax(w["out_bias"])
    bound = max(q_max, k_max, v_max, out_max, abs(scale) * head_dim * q_max * k_max)
    _check_magnitude("query", bound, "the projections or scale * q.k")
    (out, lse, probs), elapsed = _call_native(
        _native.multihead,
        x,
        kx,
        vx,
        w["q_proj"],
        w["k_proj"],
        w["v_proj"],
        w["out_proj"],
        w["q_bias"],
        w["k_bias"],
        w["v_bias"],
        w["out_bias"],
        num_heads=num_heads,
        num_kv_heads=hkv,
        scale=float(scale),
        return_weights=need_weights,
        num_threads=threads,
        **kw,
    )
    if opts.empty_rows == "nan":
        empty = np.isneginf(lse)  # (B, H, Lq); out_proj mixes heads, so any empty head -> NaN row
        out[empty.any(axis=1)] = np.nan
        if probs is not None:
            probs[empty] = np.nan
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
        output=_to_output(out, query),
        weights=_to_output(probs, query) if need_weights else None,
        lse=_to_output(lse, query) if need_weights else None,
        param_count=parameter_count(w),
        elapsed_ms=elapsed,
        flops=flops,
        weights_used=MultiheadWeights.model_construct(**w),
    )
