"""Which finite inputs each method can answer in float32, and how v is kept from overflowing.

The rule, the same for every method and every front: a finite input gets the right finite
answer, or an InputError (422) naming the value that is out of range. Scores must stay within
float32 (F32_SAFE): `scale * q.k` for exact attention (bounded by scale * D * max|q| * max|k|),
and for each approximation the quantity its own products form (`check_scores`).
Every rule reads max|q|, max|k|, max|v| from the Peaks the input checks found (inputs.Peaks),
never from another pass over the arrays.

Values are different: the output is a weighted mean of the rows of v, so it is finite whenever v
is, but the kernel forms the weighted sum before dividing by the weights' total (up to one per
key), which overflows when max|v| * Lk passes float32's range. There v is scaled per (batch, kv
head) by a power of two that brings it to at most 1 (exact: only the exponent changes), and the
output is scaled back and clipped to the head's max|v| (a mean never exceeds it; the clip only
absorbs rounding in the last place at float32's very top).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from service.core.inputs import F32_SAFE, Peaks, check_magnitude
from service.core.options import AttentionOptions, MaskingOptions


def score_scale(opts: MaskingOptions, d: int) -> float:
    """The score scale: the option, or 1/sqrt(D)."""
    return opts.scale if opts.scale is not None else 1.0 / math.sqrt(d)


def check_scores(opts: MaskingOptions, q4: np.ndarray, k4: np.ndarray, peaks: Peaks) -> float:
    """The score scale, after refusing inputs whose scores could overflow float32 (naming q):
    for exact attention and performer scale * q.k; for linformer the same against keys
    projected over the sequence (each a signed sum of Lk keys / sqrt(Lk)), whose values F v
    are bounded the same way (naming v); for linear the feature products phi(q).phi(k)
    (phi(x) = elu(x) + 1 <= 1 + |x|) summed over the keys."""
    d, lk = q4.shape[3], k4.shape[2]
    scale = score_scale(opts, d)
    qmax, kmax = peaks.q, peaks.k
    method = opts.method if isinstance(opts, AttentionOptions) else "exact"
    if method == "linear":
        bound, what = d * (1 + qmax) * (1 + kmax) * max(lk, 1), "phi(q).phi(k) over the keys"
    elif method == "linformer":
        root = math.sqrt(max(lk, 1))
        bound, what = abs(scale) * d * qmax * kmax * root, "scale * q.(E k), projected keys"
        check_magnitude("v", peaks.v * root, "the projected values F v")
    else:
        bound, what = abs(scale) * d * qmax * kmax, "scale * q.k"
    check_magnitude("q", bound, what)
    return float(scale)


def sum_growth(
    opts: MaskingOptions, q4: np.ndarray, k4: np.ndarray, peaks: Peaks, features: int = 0
) -> float:
    """How far above max|v| the weighted sums a method forms before normalising can reach:
    exact attention sums up to Lk rows of v with weights <= 1; linear weights them by
    phi(q).phi(k) (bounded as in check_scores); performer's shifted features are <= 1,
    `features` of them per product. Linformer normalises before it sums (check_scores)."""
    lk = max(k4.shape[2], 1)
    method = opts.method if isinstance(opts, AttentionOptions) else "exact"
    if method == "linear":
        return q4.shape[3] * (1 + peaks.q) * (1 + peaks.k) * lk
    if method == "performer":
        return features * lk
    if method == "linformer":
        return 1.0
    return float(lk)


@dataclass(frozen=True)
class VScaling:
    """Per (batch, kv head): the power of two v was divided by, and max|v| before it."""

    exponents: np.ndarray  # (B, Hkv, 1, 1) int32
    peaks: np.ndarray  # (B, Hkv, 1, 1) float32

    def restore(self, out: np.ndarray) -> np.ndarray:
        """An output (B, Hq, Lq, Dv) computed from the scaled v, in v's own units."""
        group = out.shape[1] // max(self.exponents.shape[1], 1)
        exponents = np.repeat(self.exponents, group, axis=1)
        peaks = np.repeat(self.peaks, group, axis=1)
        dtype = out.dtype  # bfloat16 with out_dtype "input": scaled in float32, exactly
        with np.errstate(over="ignore"):  # rounding at float32's top: clipped just below
            wide = np.ldexp(out.astype(np.float32, copy=False), exponents)
        return np.clip(wide, -peaks, peaks, out=wide).astype(dtype, copy=False)


def scale_values(
    v4: np.ndarray, growth: float, v_peak: float
) -> tuple[np.ndarray, VScaling | None]:
    """v (B, Hkv, Lk, Dv) scaled when sums reaching `growth` times max|v| (v_peak; sum_growth)
    could overflow float32, and what undoes it; v itself and None in the usual case."""
    if v_peak * growth <= F32_SAFE:
        return v4, None
    # Only bfloat16 among the 16-bit inputs reaches float32's range; a power of two keeps it
    # exact in its own dtype, which the kernel needs alike for q, k and v.
    wide = v4.astype(np.float32, copy=False)
    peaks = np.maximum(wide.max(axis=(2, 3), keepdims=True), -wide.min(axis=(2, 3), keepdims=True))
    exponents = np.frexp(peaks)[1].astype(np.int32)  # peak = m * 2^e, 0.5 <= m < 1
    scaled = np.ldexp(wide, -exponents).astype(v4.dtype, copy=False)
    return scaled, VScaling(exponents, peaks.astype(np.float32))
