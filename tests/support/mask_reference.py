"""The reference for the mask plan's tests (tests/native/test_mask_plan.py and
test_fuzz_mask_plan.py). Independent of the kernel: float64 torch over the full score matrix
(reference.py), with a
block layout expanded to a dense mask and each packed document run alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service import _native
from tests.support.reference import reference_attention

ATOL = 1e-4


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def qkv(
    seed: int, b: int, hq: int, hkv: int, lq: int, lk: int, d: int = 32, dv: int = 24
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rand(rng, b, hq, lq, d), rand(rng, b, hkv, lk, d), rand(rng, b, hkv, lk, dv)


def dense_layout(layout: np.ndarray, bq: int, bk: int, b: int, h: int, lq: int, lk: int):
    """The block layout as a (B, H, Lq, Lk) bool mask: block (qb, kb) covers its cells."""
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    full = np.broadcast_to(layout, (b, h, nqb, nkb))
    return full.repeat(bq, axis=2).repeat(bk, axis=3)[:, :, :lq, :lk]


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any):
    """(out, lse, weights) in float64 numpy, from the native keyword arguments."""
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    mask = kw.get("mask")
    if kw.get("block_layout") is not None:
        bq = kw["block_q"]
        kept = dense_layout(kw["block_layout"], bq, kw.get("block_k") or bq, b, hq, lq, lk)
        if mask is None or mask.dtype == bool:
            mask = kept if mask is None else (mask & kept)
        else:  # a float mask: disallowed cells become -inf
            mask = mask + np.where(kept, np.float32(0), np.float32(-np.inf))
    wl, wr, dil = kw.get("window_left", -1), kw.get("window_right", -1), kw.get("dilation", 1)
    window = None
    if wl >= 0 or wr >= 0 or dil > 1:
        window = {"left": wl if wl >= 0 else None, "right": wr if wr >= 0 else None}
        window["dilation"] = dil
    common = dict(
        scale=kw["scale"],
        causal={0: False, 1: "top_left", 2: "bottom_right"}[kw.get("causal", 0)],
        window=window,
        alibi_slopes=None if kw.get("alibi_slopes") is None else list(kw["alibi_slopes"]),
        softcap=kw.get("softcap"),
    )
    cq = kw.get("cu_seqlens", kw.get("cu_seqlens_q"))
    ck = kw.get("cu_seqlens", kw.get("cu_seqlens_k"))
    if cq is None:
        kl, g = kw.get("key_lengths"), kw.get("global_tokens")
        ref = reference_attention(
            q,
            k,
            v,
            mask=mask,
            key_lengths=None if kl is None else list(kl),
            global_tokens=None if g is None else list(g),
            **common,
        )
        return ref.output.numpy(), ref.lse.numpy(), ref.weights.numpy()
    # Packed documents: each one alone, placed back at its offsets.
    out = np.zeros((b, hq, lq, v.shape[3]))
    lse = np.full((b, hq, lq), -np.inf)
    w = np.zeros((b, hq, lq, lk))
    for d in range(len(cq) - 1):
        qs, qe, ks, ke = int(cq[d]), int(cq[d + 1]), int(ck[d]), int(ck[d + 1])
        if qe == qs:
            continue
        sub = None if mask is None else mask[:, :, qs:qe, ks:ke]
        ref = reference_attention(
            q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], mask=sub, **common
        )
        out[:, :, qs:qe] = ref.output.numpy()
        lse[:, :, qs:qe] = ref.lse.numpy()
        w[:, :, qs:qe, ks:ke] = ref.weights.numpy()
    return out, lse, w


def check(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> None:
    """The kernel against the reference: outputs, lse, and the weights (all rows, or those of
    weights_rows)."""
    rows = kw.get("weights_rows")
    out, lse, w = _native.attention(q, k, v, return_weights=rows is None, **kw)
    ref_out, ref_lse, ref_w = reference(q, k, v, **kw)
    if rows is not None:
        ref_w = ref_w[:, :, np.asarray(rows, dtype=np.int64)]
    assert out.shape == ref_out.shape and w.shape == ref_w.shape
    assert not np.isnan(out).any() and not np.isnan(lse).any() and not np.isnan(w).any()
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=0, atol=ATOL)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-5)
    assert (out[~finite] == 0).all()
    plain = {n: x for n, x in kw.items() if n != "weights_rows"}
    out2, lse2, none = _native.attention(q, k, v, **plain)
    assert none is None
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)
