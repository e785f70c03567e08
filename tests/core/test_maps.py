"""Exact attention maps (service.core.maps) against the dense float64 torch reference.

The reference weights come from tests/support/reference.py; pooling, entropy, top-k and column sums
are computed from them here in numpy, independently of the native pass 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from service.core.errors import InputError
from service.core.maps import attention_map
from tests.support.reference import bin_means, random_qkv, reference_attention, row_entropy


def check(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, bins: tuple[int, int], top_k: int, **opts: Any
) -> None:
    res = attention_map(q, k, v, bins=bins, top_k=top_k, **opts)
    ref_opts = {n: x for n, x in opts.items() if n not in ("empty_rows",)}
    ref = reference_attention(q, k, v, **ref_opts)
    w = ref.weights.numpy()
    lq, lk = w.shape[-2:]
    pq, pk = min(bins[0], lq), min(bins[1], lk)
    assert res.bins == (pq, pk)
    empty = ~np.isfinite(ref.lse.numpy())
    nan_rows = opts.get("empty_rows") == "nan"
    out_ref = ref.output.numpy()
    out_ref[empty] = np.nan if nan_rows else 0.0
    np.testing.assert_allclose(res.output, out_ref, atol=2e-5)
    np.testing.assert_allclose(res.pooled, bin_means(w, pq, pk), rtol=1e-4, atol=1e-7)
    ent_ref = np.where(empty, np.nan if nan_rows else 0.0, row_entropy(w))
    np.testing.assert_allclose(res.entropy, ent_ref, atol=2e-4)
    np.testing.assert_allclose(res.column_sums, w.sum(-2), rtol=1e-4, atol=1e-5)
    # Top-k: the weights must be the k largest; indices must point at those weights (ties
    # make the indices themselves ambiguous), and index -1 only past the allowed keys.
    kk = min(top_k, lk)
    allowed = ref.allowed.numpy()
    wk = np.where(allowed, w, -1.0)
    ref_top = -np.sort(-wk, axis=-1)[..., :kk]
    got_w = np.asarray(res.top_k_weights)
    got_i = np.asarray(res.top_k_indices)
    valid = ref_top >= 0
    assert ((got_i >= 0) == valid).all()
    live = valid & ~empty[..., None]
    np.testing.assert_allclose(got_w[live], ref_top[live], atol=1e-6)
    picked = np.take_along_axis(w, np.maximum(got_i, 0), axis=-1)
    np.testing.assert_allclose(got_w[live], picked[live], atol=1e-6)
    assert (np.take_along_axis(allowed, np.maximum(got_i, 0), axis=-1)[valid]).all()
    for row in got_i.reshape(-1, kk) if kk else []:
        real = row[row >= 0]
        assert len(set(real.tolist())) == len(real)  # no key twice
    if nan_rows:
        assert np.isnan(got_w[empty]).all()
    else:
        assert (got_w[~valid] == 0).all()


CASES: list[tuple[str, dict[str, Any]]] = [
    ("plain", {}),
    ("causal_top_left", {"causal": True}),
    ("causal_bottom_right", {"causal": "bottom_right"}),
    ("window_dilation", {"window": {"left": 9, "right": 4, "dilation": 3}}),
    (
        "window_globals_causal",
        {"window": {"left": 20, "right": 0}, "global_tokens": [0, 5, 130], "causal": True},
    ),
    ("key_lengths", {"key_lengths": [0, 57]}),
    ("alibi_softcap", {"alibi_slopes": True, "softcap": 2.5, "scale": 0.7}),
    ("empty_rows_nan", {"key_lengths": [0, 40], "empty_rows": "nan", "causal": True}),
]


@pytest.mark.parametrize(("name", "opts"), CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize(("lq", "lk"), [(150, 150), (97, 211)])
def test_maps_match_dense_reference(name: str, opts: dict[str, Any], lq: int, lk: int) -> None:
    q, k, v = random_qkv(2, 4, 2, lq, lk, 16, 19, seed=lq + lk)
    check(q, k, v, (7, 13), 5, **opts)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_build(isa: str) -> None:
    from service import _native

    if isa not in _native.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    before = _native.isa()
    _native.set_isa(isa)
    try:
        q, k, v = random_qkv(1, 2, 1, 101, 230, 24, 27, seed=9)
        opts = {"window": {"left": 30, "right": 7, "dilation": 2}, "global_tokens": [3, 200]}
        check(q, k, v, (9, 11), 4, causal="bottom_right", softcap=4.0, **opts)
    finally:
        _native.set_isa(before)


def test_masks_bool_and_float() -> None:
    q, k, v = random_qkv(1, 2, 2, 130, 201, 8, 11, seed=3)
    rng = np.random.default_rng(4)
    bool_mask = rng.random((1, 2, 130, 201)) < 0.7
    bool_mask[0, 1, 5] = False  # an empty row
    check(q, k, v, (10, 9), 4, mask=bool_mask)
    float_mask = np.where(rng.random((130, 201)) < 0.2, -np.inf, rng.standard_normal((130, 201)))
    check(q, k, v, (130, 201), 3, mask=float_mask.astype(np.float32))  # broadcast, unpooled


@pytest.mark.parametrize("length", [1, 2, 33, 300])
def test_lengths_bins_and_topk_beyond_the_keys(length: int) -> None:
    q, k, v = random_qkv(1, 1, 1, length, length, 4, 7, seed=length)
    check(q, k, v, (1000, 3), 10, causal=True)
    check(q, k, v, (6, 6), 0)


def test_ties_keep_the_smaller_index() -> None:
    q = np.zeros((1, 4, 4), np.float32)  # every score equal: uniform rows
    k = np.ones((1, 6, 4), np.float32)
    res = attention_map(q, k, k, bins=2, top_k=3)
    assert np.asarray(res.top_k_indices).tolist() == [[[0, 1, 2]] * 4]
    np.testing.assert_allclose(res.top_k_weights, 1 / 6, rtol=1e-6)
    np.testing.assert_allclose(res.entropy, np.log(6), rtol=1e-5)
    # Pooled rows: bin means, so the sum of pooled x key-bin width is 1.
    np.testing.assert_allclose(np.asarray(res.pooled).sum(-1) * 3, 1.0, rtol=1e-6)


def test_torch_in_torch_out_and_rank() -> None:
    torch = pytest.importorskip("torch")
    q = torch.randn(5, 8)
    res = attention_map(q, q, q, bins=(2, 3), top_k=2)
    assert isinstance(res.pooled, torch.Tensor) and tuple(res.pooled.shape) == (2, 3)
    assert tuple(res.top_k_indices.shape) == (5, 2) and res.top_k_indices.dtype == torch.int64
    assert tuple(res.column_sums.shape) == (5,)


@pytest.mark.parametrize(
    ("kwargs", "loc"),
    [
        ({"bins": 0}, "bins"),
        ({"bins": (3, 2, 1)}, "bins"),
        ({"bins": (3, "x")}, "bins"),
        ({"top_k": -1}, "top_k"),
        ({"method": "linear"}, "method"),
        ({"causal": "sideways"}, "causal"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, Any], loc: str) -> None:
    q = np.zeros((4, 8), np.float32)
    with pytest.raises(InputError) as info:
        attention_map(q, q, q, **kwargs)
    assert str(info.value.loc[0] if isinstance(info.value.loc, tuple) else info.value.loc) == loc


# ---------------------------------------------------------------------------------------------
# HTTP: pooled heatmaps beyond ATTN_HEATMAP_MAX_SIDE, and "stats"
