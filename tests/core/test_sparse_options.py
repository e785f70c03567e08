"""The Python API's sparse options: block_mask (a layout or a named pattern), packed documents
(cu_seqlens, cu_seqlens_q / cu_seqlens_k) and weights for chosen rows (weights_rows).

Results are compared with the float64 torch reference (tests/support/mask_reference.py: the
layout expanded densely, each packed document run alone); the layout helper with layouts built
here by other means.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import service
from service.core.layouts import MAX_CELLS, block_layout
from tests.support.mask_reference import reference
from tests.support.reference import bin_means, row_entropy

ATOL = 1e-4


def inputs(seed: int, *shape: int, lk: int | None = None) -> tuple[np.ndarray, ...]:
    """q with `shape` (.., Lq, D); k and v alike with Lk keys."""
    rng = np.random.default_rng(seed)
    kv = (*shape[:-2], lk or shape[-2], shape[-1])
    return tuple(rng.standard_normal(s).astype(np.float32) for s in (shape, kv, kv))


def as4(a: np.ndarray) -> np.ndarray:
    return a.reshape((1,) * (4 - a.ndim) + a.shape)


def expected(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> tuple[np.ndarray, ...]:
    """(out, lse, weights) of the reference in q's rank, from native keyword arguments."""
    out, lse, w = reference(as4(q), as4(k), as4(v), scale=q.shape[-1] ** -0.5, **kw)
    lead = q.shape[:-2]
    return (out.reshape(lead + out.shape[2:]), lse.reshape(lead + lse.shape[2:]),
            w.reshape(lead + w.shape[2:]))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# block_mask


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("form", ["bool", "int", "torch"])
def test_block_mask_layout_in_every_form_and_rank(rank: int, form: str) -> None:
    shape = {2: (130, 16), 3: (2, 130, 16), 4: (2, 2, 130, 16)}[rank]
    q, k, v = inputs(rank, *shape, lk=150)
    rng = np.random.default_rng(1)
    layout = rng.random((*shape[:-2], 3, 5)) < 0.6  # (.., ceil(130/48), ceil(150/32))
    given: Any = {"bool": layout, "int": layout.astype(np.int64), "torch": torch.from_numpy(layout)}
    res = service.attention(
        q, k, v, block_mask={"block_size": [48, 32], "layout": given[form]}, return_weights=True
    )
    lay4 = np.broadcast_to(as4(layout), (*as4(q).shape[:2], 3, 5))
    out, lse, w = expected(q, k, v, block_layout=lay4, block_q=48, block_k=32)
    np.testing.assert_allclose(res.output, out, atol=ATOL)
    np.testing.assert_allclose(res.weights, w, atol=1e-5)
    assert np.array_equal(np.isfinite(res.lse), np.isfinite(lse))


def test_block_mask_combines_with_causal_window_alibi_and_gqa() -> None:
    q, k, v = inputs(3, 2, 4, 200, 32)
    k, v = k[:, :2], v[:, :2]  # 2 kv heads for 4 query heads
    layout = np.random.default_rng(4).random((4, 4, 4)) < 0.7  # per head, broadcast over B
    kw = dict(causal=True, window={"left": 40, "right": 8}, alibi_slopes=True, softcap=20.0)
    res = service.attention(q, k, v, block_mask={"block_size": 50, "layout": layout}, **kw)
    slopes = (2.0 ** (-8.0 * np.arange(1, 5) / 4)).astype(np.float32)
    out, _, _ = expected(
        q, k, v, block_layout=np.broadcast_to(layout, (2, 4, 4, 4)), block_q=50, causal=1,
        window_left=40, window_right=8, alibi_slopes=slopes, softcap=20.0,
    )  # fmt: skip
    np.testing.assert_allclose(res.output, out, atol=ATOL)


def test_a_pattern_is_the_layout_the_helper_builds() -> None:
    q, k, v = inputs(5, 3, 300, 16)
    pattern = {"kind": "bigbird", "window": 1, "global_blocks": 1, "random_blocks": 2, "seed": 7}
    named = service.attention(q, k, v, block_mask={"block_size": 32, "pattern": pattern})
    layout = block_layout("bigbird", 300, 300, 32, window=1, global_blocks=1, random_blocks=2,
                          seed=7, num_heads=3)  # fmt: skip
    assert layout.shape == (3, 10, 10)
    drawn = service.attention(q, k, v, block_mask={"block_size": 32, "layout": layout})
    np.testing.assert_array_equal(named.output, drawn.output)
    out, _, _ = expected(q, k, v, block_layout=layout[None], block_q=32)
    np.testing.assert_allclose(named.output, out, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# The layout helper


def test_local_layout_is_the_block_band() -> None:
    lay = block_layout("local", 512, 512, 64, window=1)
    band = sum(np.eye(8, k=d, dtype=bool) for d in (-1, 0, 1)).astype(bool)
    np.testing.assert_array_equal(lay, band)
    # Query blocks twice as long as key blocks: each covers two key blocks, plus the window.
    lay = block_layout("local", 512, 512, (128, 64), window=0)
    np.testing.assert_array_equal(lay, np.kron(np.eye(4, dtype=bool), np.ones((1, 2), bool)))


def test_strided_layout_adds_every_stride_th_key_block() -> None:
    lay = block_layout("strided", 640, 640, 64, window=0, stride=4)
    cols = np.zeros(10, bool)
    cols[3::4] = True
    np.testing.assert_array_equal(lay, np.eye(10, dtype=bool) | cols[None, :])


def test_bigbird_layout_global_window_and_seeded_random_blocks() -> None:
    kw = dict(window=1, global_blocks=2, random_blocks=3, num_heads=4)
    lay = block_layout("bigbird", 1024, 1024, 64, seed=1, **kw)
    assert lay.shape == (4, 16, 16)
    assert lay[:, :2, :].all() and lay[:, :, :2].all()  # global rows and columns
    fixed = block_layout("bigbird", 1024, 1024, 64, window=1, global_blocks=2)
    assert (lay >= fixed).all()
    extra = (lay & ~fixed).sum(-1)
    assert (extra[:, 2:] == 3).all()  # exactly 3 random blocks per non-global row
    assert not np.array_equal(lay[0], lay[1])  # each head its own draw
    np.testing.assert_array_equal(lay, block_layout("bigbird", 1024, 1024, 64, seed=1, **kw))
    assert not np.array_equal(lay, block_layout("bigbird", 1024, 1024, 64, seed=2, **kw))


def test_layout_helper_errors() -> None:
    with pytest.raises(service.InputError, match="stride"):
        block_layout("strided", 64, 64, 8)
    with pytest.raises(service.InputError) as info:
        block_layout("local", 1 << 20, 1 << 20, 64)
    assert info.value.loc == ("block_mask", "block_size") and str(MAX_CELLS) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Packed documents


@pytest.mark.parametrize("form", ["list", "numpy", "torch"])
def test_packed_documents_run_as_if_alone(form: str) -> None:
    q, k, v = inputs(6, 2, 230, 16)  # (H, L, D): the batch axis is 1
    cu = [0, 40, 40, 180, 230]
    given: Any = {"list": cu, "numpy": np.array(cu), "torch": torch.tensor(cu)}[form]
    kw = dict(causal="bottom_right", window={"left": 16}, alibi_slopes=True)
    res = service.attention(q, k, v, cu_seqlens=given, return_weights=True, **kw)
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        if e > s:
            alone = service.attention(q[:, s:e], k[:, s:e], v[:, s:e], **kw)
            np.testing.assert_allclose(res.output[:, s:e], alone.output, atol=1e-6)
    assert (res.weights[:, 40:180, :40] == 0).all()  # never across documents


def test_packed_cross_attention() -> None:
    q, k, v = inputs(7, 2, 90, 16, lk=120)
    cq, ck = [0, 30, 90], [0, 70, 120]
    res = service.attention(q, k, v, cu_seqlens_q=cq, cu_seqlens_k=ck, causal=True)
    out, _, _ = expected(q, k, v, cu_seqlens_q=np.array(cq), cu_seqlens_k=np.array(ck), causal=1)
    np.testing.assert_allclose(res.output, out, atol=ATOL)


# ---------------------------------------------------------------------------------------------
# weights_rows


@pytest.mark.parametrize("rank", [2, 4])
def test_weights_rows_in_their_order(rank: int) -> None:
    q, k, v = inputs(8, *((2, 3) if rank == 4 else ())[: rank - 2], 100, 16, lk=80)
    rows = [99, 0, 50]
    res = service.attention(q, k, v, weights_rows=rows, causal=True)
    _, lse, w = expected(q, k, v, causal=1)
    assert res.weights.shape == q.shape[:-2] + (3, 80) and res.lse.shape == q.shape[:-2] + (3,)
    np.testing.assert_allclose(res.weights, w[..., rows, :], atol=1e-5)
    np.testing.assert_allclose(res.lse, lse[..., rows], atol=ATOL)
    both = service.attention(q, k, v, weights_rows=rows, causal=True, return_weights=True)
    np.testing.assert_array_equal(both.weights, res.weights)  # the rows win


def test_weights_rows_with_torch_packed_and_nan_rows() -> None:
    q, k, v = inputs(9, 2, 60, 8)
    tq, tk, tv = map(torch.from_numpy, (q, k, v))
    res = service.attention(tq, tk, tv, weights_rows=[59, 3], cu_seqlens=[0, 10, 60])
    assert isinstance(res.weights, torch.Tensor) and res.weights.shape == (2, 2, 60)
    assert (res.weights[:, 1, 10:] == 0).all()  # row 3 lives in document 0
    lengths = service.attention(q[None], k[None], v[None], weights_rows=[5], key_lengths=[0],
                                empty_rows="nan")  # fmt: skip
    assert np.isnan(lengths.weights).all() and np.isnan(lengths.output).all()


def test_multihead_weights_rows() -> None:
    x = np.random.default_rng(10).standard_normal((2, 40, 16)).astype(np.float32)
    full = service.multihead_attention(x, num_heads=4, need_weights=True, average_weights=False)
    rows = service.multihead_attention(x, num_heads=4, weights_rows=[39, 2], average_weights=False)
    np.testing.assert_allclose(rows.weights, full.weights[:, :, [39, 2]], atol=1e-6)
    np.testing.assert_allclose(rows.lse, full.lse[:, :, [39, 2]], atol=1e-6)
    mean = service.multihead_attention(x, num_heads=4, weights_rows=[7])
    assert mean.weights.shape == (2, 1, 40)
    np.testing.assert_allclose(mean.weights, full.weights[:, :, [7]].mean(1), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Maps follow the same plan


def test_attention_map_with_block_mask_and_packed_documents() -> None:
    q, k, v = inputs(11, 2, 200, 16)
    layout = np.random.default_rng(12).random((4, 4)) < 0.6
    opts = dict(block_mask={"block_size": 50, "layout": layout}, cu_seqlens=[0, 120, 200])
    maps = service.attention_map(q, k, v, bins=(20, 25), **opts)
    _, _, w = expected(q, k, v, block_layout=np.broadcast_to(layout, (1, 2, 4, 4)), block_q=50,
                       cu_seqlens=np.array([0, 120, 200]))  # fmt: skip
    np.testing.assert_allclose(maps.pooled, bin_means(w, 20, 25), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(maps.entropy, row_entropy(w), atol=2e-4)


# ---------------------------------------------------------------------------------------------
# Errors name the field


def bm(block_size: Any, **kw: Any) -> dict[str, Any]:
    """Options with a block_mask of this block size (and layout or pattern)."""
    return {"block_mask": {"block_size": block_size, **kw}}


@pytest.mark.parametrize(
    ("options", "loc", "words"),
    [
        (bm(32, layout=np.ones((5, 5), bool)), ("block_mask", "layout"), "broadcastable"),
        (bm(32, layout=np.ones((4, 4))), ("block_mask", "layout"), "bool"),
        (bm(32, layout=np.full((4, 4), 2)), ("block_mask", "layout"), "0 and 1"),
        (bm(0, layout=np.ones((4, 4), bool)), ("block_mask", "block_size"), "between 1"),
        (bm(32), ("block_mask",), "exactly one"),
        (bm(32, pattern={"kind": "strided"}), ("block_mask", "pattern"), "stride"),
        ({"cu_seqlens": [0, 90, 60, 100]}, ("cu_seqlens",), "non-decreasing"),
        ({"cu_seqlens": [0, 99]}, ("cu_seqlens",), "packed length"),
        ({"cu_seqlens_q": [0, 100]}, ("cu_seqlens_k",), "required"),
        ({"cu_seqlens": [0, 100], "key_lengths": [100]}, ("key_lengths",), "cu_seqlens"),
        ({"weights_rows": [3, 3]}, ("weights_rows",), "twice"),
        ({"weights_rows": [100]}, ("weights_rows",), "outside"),
        ({"method": "linear", "cu_seqlens": [0, 100]}, ("cu_seqlens",), "exact"),
        (
            {"method": "performer", "block_mask": {"block_size": 4, "pattern": {"kind": "local"}}},
            ("block_mask",),
            "exact",
        ),
        ({"method": "performer", "weights_rows": [1]}, ("weights_rows",), "implied"),
    ],
)
def test_bad_options_name_the_field(options: dict, loc: tuple, words: str) -> None:
    q, k, v = inputs(13, 2, 100, 16)
    with pytest.raises(service.InputError) as info:
        service.attention(q, k, v, **options)
    assert info.value.loc == loc and words in str(info.value), str(info.value)
