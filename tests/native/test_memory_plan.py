"""Recurrent memory as a producer of the mask plan (native/masking.cpp), on every instruction set
the dispatch can pick: the kernel against the float64 reference that lists each query's visible
keys and slots (tests/support/memory_reference.py), with the slots pooled here in float64, not
by the service; the plan's size follows the segments, never L x L; refusals name the option."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from service import _native
from tests.support.memory_reference import memory_reference, pooled, visible
from tests.support.reference import random_qkv

ATOL = 2e-5

# (L, S, M, C, c): segments longer and shorter than a tile (96 rows), a partial last segment,
# M below, equal to and above S, C = 0 and C > 0, rates 1 to 8.
CASES = [
    (200, 48, 0, 0, 1),
    (200, 48, 48, 0, 1),
    (260, 100, 130, 0, 1),
    (250, 32, 16, 3, 4),
    (300, 96, 96, 4, 8),
    (257, 40, 80, 2, 2),
    (130, 8, 8, 5, 1),
    (64, 64, 64, 2, 4),  # one segment: nothing before it
    (160, 16, 0, 6, 4),  # no raw memory, fewer slots before a segment than C
]


def native_memory(case: tuple[int, ...], causal: bool, pool: str, seed: int, **extra: Any):
    """(native out, lse, weights) and the reference, for B = 2, Hq = 4 over Hkv = 2."""
    n, s, m, c_slots, rate = case
    q, k, v = random_qkv(2, 4, 2, n, n, 16, 12, seed=seed)
    kk, vv = k, v
    if c_slots:  # the slots, pooled in float64 by the reference's own function
        kk = np.concatenate([k, pooled(torch.from_numpy(k).double(), rate, pool).numpy()], 2)
        vv = np.concatenate([v, pooled(torch.from_numpy(v).double(), rate, pool).numpy()], 2)
        kk, vv = kk.astype(np.float32), vv.astype(np.float32)
    got = _native.attention(
        q, kk, vv, scale=0.25, causal=int(causal), return_weights=True,
        memory_segment=s, memory_length=m, memory_compressed=c_slots, memory_rate=rate, **extra,
    )  # fmt: skip
    ref = memory_reference(
        q, k, v, segment=s, length=m, compressed=c_slots, rate=rate, pool=pool, causal=causal,
        scale=0.25, softcap=extra.get("softcap"),
        key_lengths=None if extra.get("key_lengths") is None else list(extra["key_lengths"]),
    )  # fmt: skip
    return got, ref


@pytest.mark.parametrize(
    "case", CASES, ids=[f"L{c[0]}-S{c[1]}-M{c[2]}-C{c[3]}-c{c[4]}" for c in CASES]
)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_memory_against_the_reference(isa: str, case: tuple[int, ...], causal: bool) -> None:
    for pool in ("mean", "max") if case[3] else ("mean",):
        (out, lse, w), ref = native_memory(case, causal, pool, seed=sum(case))
        np.testing.assert_allclose(out, ref.output, atol=ATOL)
        np.testing.assert_allclose(lse, ref.lse, atol=ATOL)
        n = case[0]
        np.testing.assert_allclose(w[..., :n], ref.weights, atol=ATOL)
        np.testing.assert_allclose(w[..., n:], ref.slot_weights, atol=ATOL)


def test_softcap_key_lengths_and_empty_rows(isa: str) -> None:
    # key_lengths cut below a segment's start leave its rows with nothing: lse -inf, output 0.
    case = (120, 32, 16, 0, 1)
    (out, lse, w), ref = native_memory(
        case, True, "mean", seed=3, softcap=5.0, key_lengths=np.array([120, 40])
    )
    np.testing.assert_allclose(out, ref.output, atol=ATOL)
    assert np.isneginf(lse[1, :, 64:]).all() and np.isneginf(ref.lse[1, :, 64:]).all()
    assert (out[1, :, 64:] == 0).all()
    np.testing.assert_allclose(w, ref.weights, atol=ATOL)


def test_weights_rows(isa: str) -> None:
    case = (200, 32, 32, 3, 4)
    n = case[0]
    q, k, v = random_qkv(1, 2, 2, n, n, 16, seed=5)
    kk = np.concatenate([k, pooled(torch.from_numpy(k).double(), 4, "mean").numpy()], 2)
    vv = np.concatenate([v, pooled(torch.from_numpy(v).double(), 4, "mean").numpy()], 2)
    rows = np.array([199, 0, 64, 100], dtype=np.int64)
    _, lse, w = _native.attention(
        q, kk.astype(np.float32), vv.astype(np.float32), scale=0.25, causal=1, weights_rows=rows,
        memory_segment=32, memory_length=32, memory_compressed=3, memory_rate=4,
    )  # fmt: skip
    ref = memory_reference(q, k, v, segment=32, length=32, compressed=3, rate=4, causal=True,
                           scale=0.25)  # fmt: skip
    np.testing.assert_allclose(w[..., :n], ref.weights[:, :, rows], atol=ATOL)
    np.testing.assert_allclose(w[..., n:], ref.slot_weights[:, :, rows], atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_plan_visits_the_visible_pairs_only(causal: bool) -> None:
    # Every span is full or checked; the pairs the plan visits are about the visible ones:
    # O(L (S + M + C)), not L x L, at a length no dense mask could be built for.
    n, s, m, c_slots, rate = 1 << 20, 512, 512, 64, 4
    plan = _native.mask_plan(
        1, 1, n, n + n // rate, causal=int(causal), memory_segment=s, memory_length=m,
        memory_compressed=c_slots, memory_rate=rate,
    )  # fmt: skip
    per_query = m + c_slots + (s / 2 if causal else s)
    assert plan["pairs"] <= n * (per_query + 96) and plan["pairs"] >= n * (m + c_slots) * 0.9
    assert plan["groups"] <= 6 * (n // s)  # a few tiles per segment
    raw, seen = visible(300, 48, 40, 2, 8, causal)
    small = _native.mask_plan(
        1, 1, 300, 300 + 38, causal=int(causal), memory_segment=48, memory_length=40,
        memory_compressed=2, memory_rate=8,
    )  # fmt: skip
    assert small["pairs"] >= raw.sum() + seen.sum()  # at least every visible pair


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"window_left": 4}, "window_left: cannot be combined with memory"),
        ({"dilation": 2}, "dilation: cannot be combined with memory"),
        ({"global_tokens": np.array([1])}, "global_tokens: cannot be combined with memory"),
        ({"cu_seqlens": np.array([0, 64])}, "cu_seqlens: cannot be combined with memory"),
        ({"mask": np.ones((1, 1, 64, 64), bool)}, "mask: cannot be combined with memory"),
        ({"alibi_slopes": np.ones(1, np.float32)}, "alibi_slopes: cannot be combined"),
        ({"memory_rate": 3, "memory_compressed": 1}, "memory_rate: 3 must divide memory_segment"),
        ({"memory_length": -1}, "memory_length: must be >= 0"),
        ({"memory_compressed": 2, "memory_rate": 4, "key_lengths": np.array([64])},
         "key_lengths: cannot be combined with compressed memory"),
        ({"memory_compressed": 2, "memory_rate": 4}, "so Lk must be 80, got 64"),
    ],
)  # fmt: skip
def test_refusals_name_the_option(kw: dict, message: str) -> None:
    q = np.zeros((1, 1, 64, 8), np.float32)
    args = {"memory_segment": 16, "memory_length": 16, **kw}
    with pytest.raises(ValueError, match=message):
        _native.attention(q, q, q, scale=1.0, **args)


def test_memory_parameters_without_a_segment_are_refused() -> None:
    q = np.zeros((1, 1, 8, 4), np.float32)
    with pytest.raises(ValueError, match="memory_length: given without memory_segment"):
        _native.attention(q, q, q, scale=1.0, memory_length=4)
    with pytest.raises(ValueError, match="memory_segment: must be >= 1"):
        _native.attention(q, q, q, scale=1.0, memory_segment=-2)
    with pytest.raises(ValueError, match="Lk must equal Lq=8, got 6"):
        _native.attention(q, q[:, :, :6], q[:, :, :6], scale=1.0, memory_segment=4)
