"""The mask plan's patterns, called on service._native directly, on every instruction set.

Block-sparse layouts (block_layout, block_q, block_k), packed variable-length sequences
(cu_seqlens, cu_seqlens_q / cu_seqlens_k), dilated windows and weights for chosen rows
(weights_rows), alone and combined with the other options. The reference is independent of
the kernel: float64 torch over the full score matrix (tests/reference.py), with the block
layout expanded to a dense mask and each packed document run alone
(tests/support/mask_reference.py). `isa` (tests/native/conftest.py) runs a test on every
instruction set.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service import _native
from tests.support.mask_reference import check, qkv, rand, reference

ATOL = 1e-4  # as check() uses


def layout(rng: np.random.Generator, shape: tuple[int, ...], density: float) -> np.ndarray:
    return rng.random(shape) < density


# ---------------------------------------------------------------------------------------------
# Block-sparse layouts


@pytest.mark.parametrize(
    ("bq", "bk"), [(16, 16), (128, 128), (50, 70), (1, 3), (200, 33), (300, 7), (96, 128)]
)
@pytest.mark.parametrize("broadcast", ["full", "heads", "batch", "both"])
def test_block_layout_sizes_and_broadcasting(isa: str, bq: int, bk: int, broadcast: str) -> None:
    """Block sizes unlike the kernel's tiles, not dividing the lengths; layouts broadcast."""
    b, h, lq, lk = 2, 3, 300, 260
    q, k, v = qkv(bq * 7 + bk, b, h, h, lq, lk)
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    shape = {"full": (b, h), "heads": (1, h), "batch": (b, 1), "both": (1, 1)}[broadcast]
    lay = layout(np.random.default_rng(bq + bk), (*shape, nqb, nkb), 0.4)
    check(q, k, v, scale=0.2, block_layout=lay, block_q=bq, block_k=bk)


@pytest.mark.parametrize(
    "kw",
    [
        {"causal": 1},
        {"causal": 2},
        {"window_left": 40, "window_right": 10},
        {"window_left": 7, "window_right": 3, "dilation": 3, "causal": 2},
        {"window_left": 20, "window_right": 20, "global_tokens": np.array([0, 77, 250])},
        {"key_lengths": np.array([260, 131])},
        {"alibi_slopes": np.array([0.05, 0.1, 0.2, 0.4], np.float32), "softcap": 3.0},
    ],
)
def test_block_layout_combines_with_every_option(isa: str, kw: dict) -> None:
    b, hq, hkv, lq, lk = 2, 4, 2, 290, 260  # GQA: 2 query heads per kv head
    q, k, v = qkv(11, b, hq, hkv, lq, lk)
    rng = np.random.default_rng(12)
    lay = layout(rng, (b, hq, -(-lq // 64), -(-lk // 48)), 0.5)
    check(q, k, v, scale=0.2, block_layout=lay, block_q=64, block_k=48, **kw)


def test_block_layout_with_bool_and_float_masks(isa: str) -> None:
    b, h, lq, lk = 1, 2, 200, 230
    q, k, v = qkv(13, b, h, h, lq, lk)
    rng = np.random.default_rng(14)
    lay = layout(rng, (1, h, 4, 5), 0.6)
    bmask = rng.random((b, h, lq, lk)) < 0.7
    check(q, k, v, scale=0.2, block_layout=lay, block_q=50, block_k=47, mask=bmask)
    fmask = rng.standard_normal((b, h, lq, lk)).astype(np.float32)
    check(q, k, v, scale=0.2, block_layout=lay, block_q=50, block_k=47, mask=fmask, causal=1)


def test_block_layout_rows_with_no_block_are_empty(isa: str) -> None:
    q, k, v = qkv(15, 1, 2, 2, 100, 100)
    lay = np.ones((1, 2, 4, 4), dtype=bool)
    lay[:, 0, 1] = False  # query block 1 of head 0 keeps nothing: rows 25..49 are empty
    lay[:, 1, :, 2] = False
    check(q, k, v, scale=0.2, block_layout=lay, block_q=25)  # block_k defaults to block_q
    out, lse, _ = _native.attention(q, k, v, scale=0.2, block_layout=lay, block_q=25)
    assert (out[0, 0, 25:50] == 0).all() and np.isneginf(lse[0, 0, 25:50]).all()


def test_a_dense_layout_gives_dense_attention(isa: str) -> None:
    q, k, v = qkv(16, 2, 2, 2, 257, 300)
    lay = np.ones((1, 1, 3, 3), dtype=bool)
    dense = _native.attention(q, k, v, scale=0.2, causal=1)
    blocked = _native.attention(q, k, v, scale=0.2, causal=1, block_layout=lay, block_q=128)
    np.testing.assert_allclose(blocked[0], dense[0], atol=1e-6)
    np.testing.assert_allclose(blocked[1], dense[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Packed variable-length sequences

DOCS = np.array([0, 5, 5, 130, 131, 400, 410], dtype=np.int64)  # empty, short and long documents


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": 1},
        {"causal": 2},
        {"window_left": 30, "window_right": 5},
        {"window_left": 8, "window_right": 8, "dilation": 4, "causal": 1},
        {"alibi_slopes": np.array([0.1, 0.3], np.float32), "softcap": 4.0, "causal": 2},
    ],
)
def test_packed_self_attention(isa: str, kw: dict) -> None:
    q, k, v = qkv(20, 1, 2, 1, 410, 410)  # GQA as well
    check(q, k, v, scale=0.2, cu_seqlens=DOCS, **kw)
    check(q, k, v, scale=0.2, cu_seqlens=DOCS.astype(np.int32), **kw)


@pytest.mark.parametrize("causal", [0, 1, 2])
def test_packed_cross_attention_aligns_each_document(isa: str, causal: int) -> None:
    """cu_seqlens_q != cu_seqlens_k: causality, the window and ALiBi align per document."""
    cq = np.array([0, 40, 40, 200, 230], dtype=np.int64)
    ck = np.array([0, 90, 100, 150, 400], dtype=np.int64)  # document 1 has keys, no queries
    q, k, v = qkv(21, 1, 2, 2, 230, 400)
    slopes = np.array([0.05, 0.2], np.float32)
    check(q, k, v, scale=0.2, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal)
    check(
        q, k, v, scale=0.2, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=causal,
        window_left=12, window_right=3, alibi_slopes=slopes,
    )  # fmt: skip


def test_packed_with_mask_and_layout_in_packed_coordinates(isa: str) -> None:
    q, k, v = qkv(22, 1, 2, 2, 410, 410)
    rng = np.random.default_rng(23)
    bmask = rng.random((1, 2, 410, 410)) < 0.8
    check(q, k, v, scale=0.2, cu_seqlens=DOCS, mask=bmask, causal=1)
    lay = layout(rng, (1, 2, 9, 9), 0.6)
    check(q, k, v, scale=0.2, cu_seqlens=DOCS, block_layout=lay, block_q=46, window_left=50)


def test_packed_equals_each_document_run_alone(isa: str) -> None:
    """The same as the batch of documents padded one by one, without any reference."""
    lengths = [64, 200, 1, 97]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    q, k, v = qkv(24, 1, 4, 4, int(cu[-1]), int(cu[-1]))
    packed, lse, _ = _native.attention(q, k, v, scale=0.2, causal=1, cu_seqlens=cu)
    for d in range(len(lengths)):
        s, e = int(cu[d]), int(cu[d + 1])
        alone, alone_lse, _ = _native.attention(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], scale=0.2, causal=1
        )
        np.testing.assert_allclose(packed[:, :, s:e], alone, atol=1e-6)
        np.testing.assert_allclose(lse[:, :, s:e], alone_lse, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dilated windows (rows and keys of one residue class per group)


@pytest.mark.parametrize(
    ("left", "right", "dilation"),
    [(64, 64, 2), (10, 3, 3), (5, -1, 7), (-1, 2, 5), (2, 2, 64), (1, 1, 1000), (-1, -1, 3)],
)
@pytest.mark.parametrize("causal", [0, 1, 2])
def test_dilated_windows(isa: str, left: int, right: int, dilation: int, causal: int) -> None:
    q, k, v = qkv(abs(left * 31 + right) + dilation, 1, 2, 2, 610, 700)
    check(
        q, k, v, scale=0.2, causal=causal,
        window_left=left, window_right=right, dilation=dilation,
    )  # fmt: skip


def test_dilated_windows_with_globals_key_lengths_and_masks(isa: str) -> None:
    q, k, v = qkv(30, 2, 2, 2, 500, 520)
    rng = np.random.default_rng(31)
    g = np.array([0, 3, 100, 101, 333, 519], dtype=np.int64)  # globals of every residue
    kw = dict(scale=0.2, window_left=6, window_right=6, dilation=4, global_tokens=g)
    check(q, k, v, **kw)
    check(q, k, v, causal=2, key_lengths=np.array([520, 300]), **kw)
    check(q, k, v, mask=rng.random((2, 2, 500, 520)) < 0.7, **kw)
    check(q, k, v, block_layout=layout(rng, (2, 1, 10, 11), 0.6), block_q=50, **kw)


# ---------------------------------------------------------------------------------------------
# Weights for chosen rows


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"causal": 1, "window_left": 30},
        {"window_left": 4, "window_right": 4, "global_tokens": np.array([2, 150, 299])},
        {"window_left": 3, "window_right": 3, "dilation": 5},
        {"cu_seqlens": np.array([0, 100, 100, 300], dtype=np.int64), "causal": 2},
    ],
)
def test_weights_rows(isa: str, kw: dict) -> None:
    q, k, v = qkv(40, 1, 3, 3, 300, 300)
    rows = np.array([299, 0, 152, 150, 7, 100], dtype=np.int64)  # any order, kept as given
    check(q, k, v, scale=0.2, weights_rows=rows, **kw)
    check(q, k, v, scale=0.2, weights_rows=np.zeros(0, dtype=np.int64), **kw)


def test_weights_rows_win_over_return_weights(isa: str) -> None:
    q, k, v = qkv(41, 2, 2, 2, 130, 90)
    rows = np.array([5, 129, 64], dtype=np.int64)
    _, _, w = _native.attention(q, k, v, scale=0.3, return_weights=True, weights_rows=rows)
    _, _, full = _native.attention(q, k, v, scale=0.3, return_weights=True)
    assert w.shape == (2, 2, 3, 90)
    np.testing.assert_allclose(w, full[:, :, rows], atol=1e-6)


def test_multihead_weights_rows_block_layout_and_packed(isa: str) -> None:
    rng = np.random.default_rng(42)
    lq, e, h = 150, 32, 4
    x = rand(rng, 1, lq, e)
    ws = [rand(rng, e, e) * 0.3 for _ in range(4)]
    cu = np.array([0, 60, 150], dtype=np.int64)
    lay = layout(rng, (1, h, 5, 5), 0.6)
    rows = np.array([149, 0, 61], dtype=np.int64)
    kw = dict(causal=1, cu_seqlens=cu, block_layout=lay, block_q=32, weights_rows=rows)
    out, lse, w = _native.multihead(x, x, x, *ws, num_heads=h, num_kv_heads=h, scale=0.25, **kw)
    f = lambda a: torch.from_numpy(a).double()  # noqa: E731
    heads = [(f(x) @ f(wm).T).reshape(1, lq, h, e // h).transpose(1, 2).numpy() for wm in ws[:3]]
    ref_out, ref_lse, ref_w = reference(*heads, scale=0.25, **kw)
    ref = torch.from_numpy(ref_out).transpose(1, 2).reshape(1, lq, e) @ f(ws[3]).T
    np.testing.assert_allclose(out, ref.numpy(), atol=ATOL)
    np.testing.assert_allclose(lse, ref_lse, atol=ATOL)
    np.testing.assert_allclose(w, ref_w[:, :, rows], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The maps kernel follows the same plan


def maps_reference(w: np.ndarray, lse: np.ndarray, pq: int, pk: int):
    lq, lk = w.shape[-2:]
    qe, ke = (np.arange(pq + 1) * lq) // pq, (np.arange(pk + 1) * lk) // pk
    pooled = np.zeros((*w.shape[:-2], pq, pk))
    for a in range(pq):
        for b in range(pk):
            pooled[..., a, b] = w[..., qe[a] : qe[a + 1], ke[b] : ke[b + 1]].mean(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(w > 0, w * np.log(w), 0.0).sum(-1)
    return pooled, ent, w.sum(-2)


@pytest.mark.parametrize(
    "kw",
    [
        {"block_layout": np.array([[[[1, 0, 1], [0, 1, 1], [1, 1, 0]]]], bool), "block_q": 70},
        {"cu_seqlens": np.array([0, 30, 30, 170, 200], dtype=np.int64), "causal": 1},
        {"window_left": 5, "window_right": 2, "dilation": 3, "global_tokens": np.array([1, 99])},
        {"window_left": 9, "window_right": 9, "dilation": 2, "causal": 2},
    ],
)
def test_attention_maps_follow_the_plan(isa: str, kw: dict) -> None:
    q, k, v = qkv(50, 1, 2, 2, 200, 200)
    pq, pk, top = 7, 9, 5
    out, lse, pooled, ent, top_i, top_w, colsum = _native.attention_maps(
        q, k, v, scale=0.2, bins_q=pq, bins_k=pk, top_k=top, **kw
    )
    ref_out, ref_lse, ref_w = reference(q, k, v, scale=0.2, **kw)
    np.testing.assert_allclose(out, ref_out, atol=ATOL)
    ref_pooled, ref_ent, ref_col = maps_reference(ref_w, ref_lse, pq, pk)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ent, ref_ent, atol=2e-4)
    np.testing.assert_allclose(colsum, ref_col, rtol=1e-4, atol=1e-5)
    # Top-k: the k largest weights, largest first, ties by the smaller key index.
    order = np.lexsort((np.broadcast_to(np.arange(200), ref_w.shape), -ref_w), axis=-1)
    ref_top_w = np.take_along_axis(ref_w, order, -1)[..., :top]
    np.testing.assert_allclose(top_w, ref_top_w, atol=1e-6)
    live = ref_top_w > 1e-5  # clear of ties between tiny weights
    np.testing.assert_array_equal(top_i[live], order[..., :top][live])


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError whose message starts with the field


def _bad() -> list[tuple[dict, str]]:
    lay = np.ones((1, 2, 2, 2), dtype=bool)
    return [
        ({"block_layout": lay, "block_q": 0}, r"^block_q: must be >= 1"),
        ({"block_layout": lay, "block_q": 4, "block_k": -1}, r"^block_k: must be >= 1"),
        ({"block_q": 4}, r"^block_q: given without a block_layout"),
        ({"block_layout": lay, "block_q": 2}, r"^block_layout: shape \(1, 2, 2, 2\) is not broad"),
        ({"block_layout": lay[0], "block_q": 4}, r"^block_layout: expected 4 dimensions"),
        ({"block_layout": lay.astype(np.int64), "block_q": 4}, r"^block_layout: expected dtype b"),
        ({"cu_seqlens": np.array([0, 3, 2, 8])}, r"^cu_seqlens: must be non-decreasing"),
        ({"cu_seqlens": np.array([1, 8])}, r"^cu_seqlens: must start at 0"),
        ({"cu_seqlens": np.array([0, 7])}, r"^cu_seqlens: must end at the packed length Lq=8"),
        ({"cu_seqlens": np.array([0])}, r"^cu_seqlens: expected at least 2 offsets"),
        ({"cu_seqlens": np.array([0, 8.0])}, r"^cu_seqlens: expected dtype int32 or int64"),
        ({"cu_seqlens_q": np.array([0, 8])}, r"^cu_seqlens_k: required with cu_seqlens_q"),
        (
            {"cu_seqlens_q": np.array([0, 8]), "cu_seqlens_k": np.array([0, 2, 8])},
            r"^cu_seqlens_k: has 2 documents, cu_seqlens_q 1",
        ),
        (
            {"cu_seqlens": np.array([0, 8]), "cu_seqlens_q": np.array([0, 8])},
            r"^cu_seqlens: give cu_seqlens, or cu_seqlens_q and cu_seqlens_k",
        ),
        (
            {"cu_seqlens": np.array([0, 8]), "key_lengths": np.array([8, 8])},
            r"^cu_seqlens: packed sequences need a batch axis of 1",
        ),
        ({"weights_rows": np.array([0, 8])}, r"^weights_rows: row 8 at index 1 is outside \[0, 8"),
        ({"weights_rows": np.array([-1])}, r"^weights_rows: row -1 at index 0 is outside"),
        ({"weights_rows": np.array([3, 1, 3])}, r"^weights_rows: row 3 appears twice"),
        ({"weights_rows": np.array([1], np.int32)}, r"^weights_rows: expected dtype int64"),
        ({"weights_rows": np.array([[1]])}, r"^weights_rows: expected 1 dimension"),
        ({"weights_rows": np.arange(9)}, r"^weights_rows: 9 rows asked for, but Lq=8"),
        (
            {"cu_seqlens": np.zeros(1042, dtype=np.int64)},  # more documents than 8 + 8 + 1024
            r"^cu_seqlens: 1041 documents are more than Lq \+ Lk \+ 1024 = 1040",
        ),
    ]


def test_bad_arguments_name_the_field() -> None:
    q, k, v = qkv(60, 2, 2, 2, 8, 8, d=8, dv=8)
    for kw, message in _bad():
        with pytest.raises(ValueError, match=message):
            _native.attention(q, k, v, scale=0.3, **kw)


def test_packed_sequences_refuse_key_lengths_and_global_tokens() -> None:
    q, k, v = qkv(61, 1, 2, 2, 8, 8, d=8, dv=8)
    cu = np.array([0, 3, 8])
    with pytest.raises(ValueError, match="^key_lengths: cannot be combined with cu_seqlens"):
        _native.attention(q, k, v, scale=0.3, cu_seqlens=cu, key_lengths=np.array([8]))
    with pytest.raises(ValueError, match="^global_tokens: cannot be combined with cu_seqlens"):
        _native.attention(
            q, k, v, scale=0.3, cu_seqlens=cu, global_tokens=np.array([1]), window_left=2
        )
    with pytest.raises(ValueError, match="^cu_seqlens: must end at the packed length"):
        _native.attention_maps(q, k, v, scale=0.3, cu_seqlens=np.array([0, 9]))
    x = q[0].transpose(1, 0, 2).reshape(1, 8, 16)
    w = [np.eye(16, dtype=np.float32)] * 4
    with pytest.raises(ValueError, match="^weights_rows: row 9"):
        _native.multihead(
            x, x, x, *w, num_heads=2, num_kv_heads=2, scale=0.3, weights_rows=np.array([9])
        )


# ---------------------------------------------------------------------------------------------
# The plan's size follows the tiles, never Lq x Lk


def test_plan_size_follows_the_tiles() -> None:
    n = 1 << 24  # a plan for 16M rows: only its groups and spans are built
    plan = _native.mask_plan(1, 8, n, n, window_left=128, window_right=128)
    groups = -(-n // 96)
    assert plan["groups"] == groups and plan["spans"] <= 3 * groups
    assert plan["pairs"] <= 8 * n * (257 + 2 * 96)  # the band and the rows of a group, no more
    dense = _native.mask_plan(2, 4, 5000, 7000)
    assert dense["spans"] == dense["groups"] == dense["full_spans"] == 2 * -(-5000 // 96)
    assert dense["pairs"] == 2 * 4 * 5000 * 7000


def test_plan_visits_only_kept_blocks_and_the_dilated_keys() -> None:
    lay = np.random.default_rng(70).random((1, 8, 64, 64)) < 0.125
    blocks = _native.mask_plan(1, 8, 8192, 8192, block_layout=lay, block_q=128)
    assert blocks["head_dependent"] and blocks["pairs"] == lay.sum() * 128 * 128
    assert blocks["full_spans"] == blocks["spans"]  # aligned blocks need no element checks
    window = _native.mask_plan(1, 8, 8192, 8192, window_left=64, window_right=64)
    dilated = _native.mask_plan(1, 8, 8192, 8192, window_left=64, window_right=64, dilation=2)
    assert dilated["pairs"] <= window["pairs"]  # a dilated window visits its own keys only
    packed = _native.mask_plan(1, 8, 8192, 8192, causal=1, cu_seqlens=np.arange(0, 8193, 1024))
    assert packed["pairs"] <= 8 * 8 * 1024 * (1024 + 96)  # each document's causal triangle
    with pytest.raises(ValueError, match="^kernel: expected 'attention' or 'maps'"):
        _native.mask_plan(1, 1, 4, 4, kernel="gpu")
