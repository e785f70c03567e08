"""The masking options as the native kernels' keyword arguments, checked against the shapes.

Every kernel entry point (attention, multihead, attention_maps) takes the same masking
arguments; this is the one place that builds them from a MaskingOptions model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core.errors import InputError
from service.core.inputs import F32_SAFE, Peaks, check_magnitude, is_float_dtype, qkv_4d
from service.core.layouts import block_layout
from service.core.options import BlockMask, MaskingOptions

CAUSAL_CODES = {None: 0, "top_left": 1, "bottom_right": 2}


def mask_4d(mask: np.ndarray, convention: str, shape: tuple[int, int, int, int]) -> np.ndarray:
    """The mask as bool (True = attend) or float32, broadcast to `shape` as a strided view."""
    kind = "f" if is_float_dtype(mask.dtype) else mask.dtype.kind
    if kind == "b":
        m = ~mask if convention == "ignore" else mask
    elif kind == "f":
        with np.errstate(over="ignore"):  # huge negatives becoming -inf is what they mean
            m = mask.astype(np.float32, copy=False)
        if np.isnan(m).any():
            raise InputError("mask", "float mask contains NaN")
        if m.size and m.max() > F32_SAFE:  # +inf, or near it: scores would overflow
            raise InputError(
                "mask",
                f"float mask holds {m.max():.3g}; values above {F32_SAFE:.0e} overflow "
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


def layout_4d(bm: BlockMask, shape: tuple[int, int, int, int]) -> dict[str, Any]:
    """The kernel's block_layout (bool, broadcast to (B, H, nqb, nkb)), block_q and block_k."""
    b, h, lq, lk = shape
    bq, bk = bm.sizes
    blocks = (b, h, -(-lq // bq), -(-lk // bk))
    if bm.pattern is not None:
        p = bm.pattern
        pattern = p.model_dump(exclude={"kind"})  # window, stride, global and random blocks, seed
        layout = block_layout(p.kind, lq, lk, (bq, bk), num_heads=h, **pattern)
    else:
        assert bm.layout is not None  # the model holds exactly one of layout and pattern
        layout = bm.layout
        if layout.dtype.kind in "iu":
            if layout.size and not np.isin(layout, (0, 1)).all():
                raise InputError(("block_mask", "layout"), "integer layouts hold only 0 and 1")
            layout = layout.astype(bool)
        elif layout.dtype.kind != "b":
            raise InputError(
                ("block_mask", "layout"),
                f"expected a bool (or 0/1 integer) layout, got dtype {layout.dtype}",
            )
        if not layout.flags.aligned or any(s < 0 for s in layout.strides):
            layout = layout.copy()  # the kernel reads through strides, non-negative ones
    try:
        layout4 = np.broadcast_to(layout, blocks)
    except ValueError:
        raise InputError(
            ("block_mask", "layout"),
            f"shape {tuple(layout.shape)} is not broadcastable to (B, H, ceil(Lq/bq), "
            f"ceil(Lk/bk)) = {blocks}",
        ) from None
    return {"block_layout": layout4, "block_q": bq, "block_k": bk}


def prepare(
    q: Any, k: Any, v: Any, opts: MaskingOptions, *, keep_half: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, dict[str, Any], Peaks]:
    """q, k, v checked and 4-D (float32, or float16 / bfloat16 kept with keep_half), the rank
    the caller used, the masking options as the kernel's arguments (checked against the
    shapes), and max|x| of q, k, v as the checks found them."""
    q4, k4, v4, rank, peaks = qkv_4d(q, k, v, keep_half=keep_half)
    b, hq, lq, _ = q4.shape
    return q4, k4, v4, rank, native_masking(opts, (b, hq, lq, k4.shape[2])), peaks


def native_masking(opts: MaskingOptions, shape: tuple[int, int, int, int]) -> dict[str, Any]:
    """Keyword arguments of the native kernels for the masking options, checked against shape."""
    b, h, lq, lk = shape
    for name in ("scale", "softcap"):
        check_magnitude(name, abs(getattr(opts, name) or 0.0), name)
    kw: dict[str, Any] = {
        "causal": CAUSAL_CODES[opts.causal_mode],
        "softcap": float(opts.softcap or 0.0),
    }
    if opts.mask is not None:
        kw["mask"] = mask_4d(opts.mask, opts.mask_convention, shape)
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
    if opts.block_mask is not None:
        kw.update(layout_4d(opts.block_mask, shape))
    # Packed documents: the offsets are checked natively (errors name the field).
    for name in ("cu_seqlens", "cu_seqlens_q", "cu_seqlens_k"):
        offsets = getattr(opts, name)
        if offsets is not None:
            kw[name] = np.asarray(offsets, dtype=np.int64)
    slopes = opts.alibi_slopes
    if slopes is True:
        kw["alibi_slopes"] = (2.0 ** (-8.0 * np.arange(1, h + 1) / h)).astype(np.float32)
    elif isinstance(slopes, list):
        if len(slopes) != h:
            raise InputError(
                "alibi_slopes", f"has {len(slopes)} slopes; expected one per head ({h})"
            )
        for i, slope in enumerate(slopes):
            check_magnitude(("alibi_slopes", i), abs(slope) * max(lq, lk), "the ALiBi bias")
        kw["alibi_slopes"] = np.asarray(slopes, dtype=np.float32)
    return kw
