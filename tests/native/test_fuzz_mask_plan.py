"""Hypothesis fuzzing of the mask plan: random combinations of every masking option.

Random shapes (empty ones included), block layouts of any block size and broadcast, packed
documents (empty ones included), dilated windows, global tokens, key lengths, masks, ALiBi,
softcap and weights for random rows, on a random instruction set; each example must give the
float64 reference's answer (mask_reference.reference: the layout expanded densely, documents
run one by one). A broken variant of a valid example (a bad layout shape, offsets that go
back, a row out of range) must give a ValueError naming the field.

ATTN_FUZZ_SCALE multiplies the number of examples (`make fuzz` runs 10x).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service import _native
from tests.support.mask_reference import check
from tests.support.native import ISAS, fuzz_settings, isa_set

fuzz = fuzz_settings(80)


def offsets(draw: st.DrawFn, total: int, docs: int) -> np.ndarray:
    cuts = sorted(draw(st.lists(st.integers(0, total), min_size=docs - 1, max_size=docs - 1)))
    return np.array([0, *cuts, total], dtype=draw(st.sampled_from([np.int64, np.int32])))


@st.composite
def calls(draw: st.DrawFn) -> tuple[list[np.ndarray], dict[str, Any]]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    packed = draw(st.booleans())
    b = 1 if packed else draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 2))
    lq, lk = draw(st.integers(0, 260)), draw(st.integers(0, 260))
    d, dv = draw(st.sampled_from([8, 16, 33])), draw(st.integers(1, 20))
    q = rng.standard_normal((b, hq, lq, d), dtype=np.float32)
    k = rng.standard_normal((b, hkv, lk, d), dtype=np.float32)
    v = rng.standard_normal((b, hkv, lk, dv), dtype=np.float32)
    kw: dict[str, Any] = {"scale": draw(st.sampled_from([0.1, 0.3, 1.0]))}
    kw["causal"] = draw(st.integers(0, 2))
    if draw(st.booleans()):
        kw["window_left"] = draw(st.integers(-1, 40))
        kw["window_right"] = draw(st.integers(-1, 40))
        kw["dilation"] = draw(st.sampled_from([1, 1, 2, 3, 7, 300]))
    window = kw.get("window_left", -1) >= 0 or kw.get("window_right", -1) >= 0
    window = window or kw.get("dilation", 1) > 1
    if packed:
        docs = draw(st.integers(1, 5))
        kw["cu_seqlens_q"] = offsets(draw, lq, docs)
        kw["cu_seqlens_k"] = offsets(draw, lk, docs) if lq != lk or draw(st.booleans()) else None
        if kw["cu_seqlens_k"] is None:
            kw["cu_seqlens"] = kw.pop("cu_seqlens_q")
            del kw["cu_seqlens_k"]
    else:
        if draw(st.booleans()):
            kw["key_lengths"] = rng.integers(0, lk + 1, size=b).astype(np.int64)
        if window and lk and draw(st.booleans()):
            n = draw(st.integers(1, min(lk, 6)))
            kw["global_tokens"] = np.sort(rng.choice(lk, size=n, replace=False)).astype(np.int64)
    if draw(st.booleans()):
        bq = draw(st.sampled_from([1, 7, 32, 64, 100, 128, 300]))
        bk = draw(st.sampled_from([0, 1, 5, 48, 128, 500]))
        nqb, nkb = -(-lq // bq), -(-lk // (bk or bq))
        shape = (
            draw(st.sampled_from([1, b])),
            draw(st.sampled_from([1, hq])),
            draw(st.sampled_from([1, nqb])),
            draw(st.sampled_from([1, nkb])),
        )
        kw["block_layout"] = rng.random(shape) < draw(st.sampled_from([0.1, 0.5, 0.9]))
        kw["block_q"], kw["block_k"] = bq, bk
    mask = draw(st.sampled_from([None, "bool", "float"]))
    if mask == "bool":
        kw["mask"] = rng.random((b, hq, lq, lk)) < 0.8
    elif mask == "float":
        kw["mask"] = rng.standard_normal((b, hq, lq, lk)).astype(np.float32)
    if draw(st.booleans()):
        kw["alibi_slopes"] = rng.uniform(0, 0.3, hq).astype(np.float32)
    if draw(st.booleans()):
        kw["softcap"] = draw(st.sampled_from([2.0, 30.0]))
    if lq and draw(st.booleans()):
        n = draw(st.integers(0, min(lq, 8)))
        kw["weights_rows"] = rng.permutation(lq)[:n].astype(np.int64)
    return [q, k, v], kw


@fuzz
@given(call=calls(), isa=st.sampled_from(ISAS))
def test_random_combinations_match_the_reference(call: tuple, isa: str) -> None:
    (q, k, v), kw = call
    with isa_set(isa):
        check(q, k, v, **kw)


def _broken(kw: dict[str, Any], lq: int, lk: int, how: int) -> tuple[dict[str, Any], str] | None:
    """A broken copy of valid arguments and the field its error must name (None: no such
    break applies)."""
    kw = dict(kw)
    if how == 0 and "block_layout" in kw:
        lay = kw["block_layout"]
        nkb = -(-lk // (kw["block_k"] or kw["block_q"]))
        kw["block_layout"] = np.ones((*lay.shape[:3], nkb + 2), dtype=bool)  # neither nkb nor 1
        return kw, "block_layout"
    if how == 1 and "cu_seqlens" in kw and len(kw["cu_seqlens"]) > 2 and kw["cu_seqlens"][-1]:
        cu = kw["cu_seqlens"].copy()
        cu[1] = cu[-1] + 1
        kw["cu_seqlens"] = cu
        return kw, "cu_seqlens"
    if how == 2 and lq:
        kw["weights_rows"] = np.array([0, lq], dtype=np.int64)
        return kw, "weights_rows"
    if how == 3 and "block_layout" in kw:
        kw["block_q"] = 0
        return kw, "block_q"
    return None


@fuzz
@given(call=calls(), how=st.integers(0, 3))
def test_broken_variants_name_the_field(call: tuple, how: int) -> None:
    (q, k, v), kw = call
    broken = _broken(kw, q.shape[2], k.shape[2], how)
    if broken is None:
        return
    kw, field = broken
    with pytest.raises(ValueError, match=f"^{field}: "):
        _native.attention(q, k, v, **kw)
