"""The kernels' key range (key_begin, key_end): one slice of the keys with every position
absolute, as split-KV attention needs it (service.core.split, service.distributed).

On random combinations of every masking option (the mask plan fuzzer's strategy), a slice's
result is the float64 reference's with the keys outside the slice masked out, and the slices of
any split merge into the whole call exactly. The plan visits only the slice's keys, and bad
ranges are refused naming the argument.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import _native
from tests.native.test_fuzz_mask_plan import calls
from tests.support.mask_reference import ATOL, reference
from tests.support.native import fuzz_settings

fuzz = fuzz_settings(40)


def _restricted(kw: dict[str, Any], lq: int, lk: int, a: int, b: int, bh: tuple[int, int]):
    """kw with a mask that also excludes the keys outside [a, b) (for the reference)."""
    inside = np.zeros((*bh, lq, lk), dtype=bool)
    inside[..., a:b] = True
    mask = kw.get("mask")
    if mask is None:
        mask = inside
    elif mask.dtype == bool:
        mask = mask & inside
    else:
        mask = np.where(inside, mask, np.float32(-np.inf)).astype(np.float32)
    return {**kw, "mask": mask}


@fuzz
@given(call=calls(), cuts=st.lists(st.floats(0, 1), min_size=0, max_size=7))
def test_slices_match_the_reference_and_merge_into_the_whole(call: tuple, cuts: list) -> None:
    (q, k, v), kw = call
    kw.pop("weights_rows", None)
    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    edges = sorted({0, lk, *(int(c * lk) for c in cuts)})
    whole_out, whole_lse, whole_w = _native.attention(q, k, v, return_weights=True, **kw)
    outs, lses, ws = [], [], []
    for a, e in zip(edges[:-1], edges[1:], strict=True):
        out, lse, w = _native.attention(q, k, v, return_weights=True, key_begin=a, key_end=e, **kw)
        ref_out, ref_lse, ref_w = reference(q, k, v, **_restricted(kw, lq, lk, a, e, (b, hq)))
        np.testing.assert_allclose(out, ref_out, rtol=0, atol=ATOL)
        np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
        finite = np.isfinite(ref_lse)
        np.testing.assert_allclose(lse[finite], ref_lse[finite], rtol=0, atol=ATOL)
        np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-5)
        assert not w[..., :a].any() and not w[..., e:].any()
        outs.append(out.astype(np.float64))
        lses.append(lse.astype(np.float64))
        ws.append(w.astype(np.float64))
    if len(outs) < 2:
        return
    with np.errstate(invalid="ignore"):
        lse = np.logaddexp.reduce(np.stack(lses), axis=0)
        factors = np.nan_to_num(np.exp(np.stack(lses) - lse), nan=0.0)
    merged = sum(f[..., None] * o for f, o in zip(factors, outs, strict=True))
    merged_w = sum(f[..., None] * w for f, w in zip(factors, ws, strict=True))
    np.testing.assert_allclose(merged, whole_out, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(whole_lse))
    finite = np.isfinite(whole_lse)
    np.testing.assert_allclose(lse[finite], whole_lse[finite], rtol=0, atol=1e-5)
    np.testing.assert_allclose(merged_w, whole_w, rtol=0, atol=1e-6)


def test_a_slice_visits_only_its_keys() -> None:
    b, hq, lq, lk = 1, 2, 512, 1000
    whole = _native.mask_plan(b, hq, lq, lk, kernel="attention")["pairs"]
    assert whole == b * hq * lq * lk
    slices = [(0, 300), (300, 301), (301, 1000)]
    pairs = [
        _native.mask_plan(b, hq, lq, lk, key_begin=a, key_end=e, kernel="attention")["pairs"]
        for a, e in slices
    ]
    assert pairs == [b * hq * lq * (e - a) for a, e in slices]
    # Causal: a slice of late keys leaves the early rows nothing to visit.
    causal = _native.mask_plan(b, hq, lq, lk, causal=1, key_begin=600, kernel="attention")
    assert causal["pairs"] == 0  # rows i < 512 see keys j <= i only


@pytest.mark.parametrize(
    ("begin", "end", "field"),
    [(-1, -1, "key_begin"), (11, -1, "key_begin"), (0, 11, "key_end"), (5, 4, "key_end"),
     (0, -2, "key_end")],
)  # fmt: skip
def test_bad_ranges_name_the_argument(begin: int, end: int, field: str) -> None:
    q = np.ones((1, 1, 4, 8), dtype=np.float32)
    k = np.ones((1, 1, 10, 8), dtype=np.float32)
    with pytest.raises(ValueError, match=f"^{field}: "):
        _native.attention(q, k, k, scale=1.0, key_begin=begin, key_end=end)
