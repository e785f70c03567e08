"""Exact attention maps (service.maps) against the dense float64 torch reference.

The reference weights come from tests/reference.py; pooling, entropy, top-k and column sums
are computed from them here in numpy, independently of the native pass 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from reference import reference_attention

from service.errors import InputError
from service.maps import attention_map


def edges(n: int, bins: int) -> np.ndarray:
    return (np.arange(bins + 1) * n) // bins


def pool(w: np.ndarray, pq: int, pk: int) -> np.ndarray:
    """Bin means of (.., Lq, Lk) over near-equal contiguous bins, cell by cell."""
    lq, lk = w.shape[-2:]
    qe, ke = edges(lq, pq), edges(lk, pk)
    out = np.zeros((*w.shape[:-2], pq, pk))
    for a in range(pq):
        for b in range(pk):
            out[..., a, b] = w[..., qe[a] : qe[a + 1], ke[b] : ke[b + 1]].mean(axis=(-2, -1))
    return out


def entropy(w: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(w > 0, w * np.log(w), 0.0).sum(-1)


def inputs(
    b: int, hq: int, hkv: int, lq: int, lk: int, d: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, hq, lq, d)).astype(np.float32)
    k = rng.standard_normal((b, hkv, lk, d)).astype(np.float32)
    v = rng.standard_normal((b, hkv, lk, d + 3)).astype(np.float32)
    return q, k, v


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
    np.testing.assert_allclose(res.pooled, pool(w, pq, pk), rtol=1e-4, atol=1e-7)
    ent_ref = np.where(empty, np.nan if nan_rows else 0.0, entropy(w))
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
    q, k, v = inputs(2, 4, 2, lq, lk, 16, seed=lq + lk)
    check(q, k, v, (7, 13), 5, **opts)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_every_instruction_set_build(isa: str) -> None:
    from service import _native

    if isa not in _native.available_isas():
        pytest.skip(f"this CPU cannot run the {isa} build")
    before = _native.isa()
    _native.set_isa(isa)
    try:
        q, k, v = inputs(1, 2, 1, 101, 230, 24, seed=9)
        opts = {"window": {"left": 30, "right": 7, "dilation": 2}, "global_tokens": [3, 200]}
        check(q, k, v, (9, 11), 4, causal="bottom_right", softcap=4.0, **opts)
    finally:
        _native.set_isa(before)


def test_masks_bool_and_float() -> None:
    q, k, v = inputs(1, 2, 2, 130, 201, 8, seed=3)
    rng = np.random.default_rng(4)
    bool_mask = rng.random((1, 2, 130, 201)) < 0.7
    bool_mask[0, 1, 5] = False  # an empty row
    check(q, k, v, (10, 9), 4, mask=bool_mask)
    float_mask = np.where(rng.random((130, 201)) < 0.2, -np.inf, rng.standard_normal((130, 201)))
    check(q, k, v, (130, 201), 3, mask=float_mask.astype(np.float32))  # broadcast, unpooled


@pytest.mark.parametrize("length", [1, 2, 33, 300])
def test_lengths_bins_and_topk_beyond_the_keys(length: int) -> None:
    q, k, v = inputs(1, 1, 1, length, length, 4, seed=length)
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


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from http_support import client

    with client(tmp_path_factory.mktemp("maps"), heatmap_max_side=16) as c:
        yield c


def test_http_heatmap_over_the_limit_is_pooled(http: Any) -> None:
    from http_support import b64, post

    from service.heatmaps import render_map

    q, k, v = inputs(1, 2, 1, 40, 40, 8, seed=11)
    body = {"q": b64(q), "k": b64(k), "v": b64(v), "causal": True}
    r = post(http, "/v1/attention", {**body, "heatmap": {"heads": [1], "inline": True}})
    assert r.status_code == 200, r.text
    images = r.json()["heatmaps"]
    assert [im["head"] for im in images] == [1]
    # The image is the pooled map (16 x 16 bin means) titled as pooled: render the reference
    # pooling with the same title and compare the pictures pixel for pixel.
    import base64
    import io

    from PIL import Image

    w = reference_attention(q, k, v, causal=True).weights.numpy()
    expected = render_map(
        pool(w, 16, 16)[0, 1].astype(np.float32),
        title="attention pooled 40×40→16×16 (bin means), batch 0, head 1",
    )
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[0]["png"]))))
    want = np.asarray(Image.open(io.BytesIO(expected)))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    # Within the limit nothing changes: the dense map is drawn, no pooling.
    small = {"q": b64(q[:, :, :16]), "k": b64(k[:, :, :16]), "v": b64(v[:, :, :16])}
    r = post(http, "/v1/attention", {**small, "heatmap": {"inline": True, "heads": [0]}})
    assert r.status_code == 200, r.text


def test_http_stats(http: Any) -> None:
    from http_support import post

    q, k, v = inputs(1, 2, 2, 30, 30, 8, seed=12)
    body = {
        "q": q[0].tolist(),
        "k": k[0].tolist(),
        "v": v[0].tolist(),
        "stats": True,
        "top_k": 3,
        "window": {"left": 4, "right": 0},
        "key_lengths": [25],
    }
    r = post(http, "/v1/attention", body)
    assert r.status_code == 200, r.text
    stats = r.json()["stats"]
    ref = reference_attention(q, k, v, window={"left": 4, "right": 0}, key_lengths=[25])
    w = ref.weights.numpy()[0]
    np.testing.assert_allclose(stats["entropy"], entropy(w), atol=1e-4)
    np.testing.assert_allclose(stats["column_sums"], w.sum(-2), atol=1e-4)
    np.testing.assert_allclose(stats["top_k"]["weights"], -np.sort(-w, -1)[..., :3], atol=1e-5)
    idx = np.array(stats["top_k"]["indices"])
    assert idx.shape == (2, 30, 3)
    np.testing.assert_allclose(np.take_along_axis(w, idx, -1), stats["top_k"]["weights"], atol=1e-5)
    np.testing.assert_allclose(r.json()["output"], ref.output.numpy()[0], atol=1e-5)
    assert post(http, "/v1/attention", {**body, "method": "linear"}).status_code == 422
