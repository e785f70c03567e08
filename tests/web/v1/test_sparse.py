"""/v1/attention and /v1/multihead with the sparse options, in process: block_mask (a layout in
any tensor encoding, or a named pattern), packed documents and weights for chosen rows answer
exactly what the Python API answers (itself checked against the float64 reference in
tests/core/test_sparse_options.py); bad values are a 422 naming the field."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import service
from tests.support.http import assert_problem, b64, decode, post
from tests.support.mask_reference import reference

APP_SETTINGS = {"max_elements": 200_000}


def qkv(seed: int, shape: tuple[int, ...] = (2, 120, 16)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n in ("q", "k", "v")}


@pytest.mark.parametrize(
    "layout",
    [
        lambda a: a.tolist(),  # nested true/false
        lambda a: a.astype(int).tolist(),  # nested 0/1
        lambda a: b64(a),  # {dtype: bool, shape, b64}
    ],
)
def test_block_mask_layout_in_every_encoding(client, layout) -> None:
    x = qkv(1)
    lay = np.random.default_rng(2).random((2, 3, 4)) < 0.5  # (H, ceil(120/48), ceil(120/32))
    block_mask = {"block_size": [48, 32], "layout": layout(lay)}
    r = post(client, "/v1/attention", {**x, "block_mask": block_mask, "return_weights": True})
    assert r.status_code == 200, r.text
    body = r.json()
    want = service.attention(**x, block_mask={"block_size": [48, 32], "layout": lay},
                             return_weights=True)  # fmt: skip
    np.testing.assert_array_equal(decode(body["output"]).astype(np.float32), want.output)
    np.testing.assert_array_equal(decode(body["weights"]).astype(np.float32), want.weights)
    # And independently: the reference with the layout expanded.
    out, _, _ = reference(*(x[n][None] for n in "qkv"), scale=0.25, block_layout=lay[None],
                          block_q=48, block_k=32)  # fmt: skip
    np.testing.assert_allclose(decode(body["output"]), out[0], atol=1e-4)


def test_block_mask_pattern(client) -> None:
    x = qkv(3)
    pattern = {"kind": "strided", "window": 0, "stride": 2}
    r = post(client, "/v1/attention", {**x, "block_mask": {"block_size": 30, "pattern": pattern}})
    assert r.status_code == 200, r.text
    want = service.attention(**x, block_mask={"block_size": 30, "pattern": pattern})
    np.testing.assert_array_equal(decode(r.json()["output"]).astype(np.float32), want.output)


def test_packed_documents_and_weights_rows(client) -> None:
    x = qkv(4)
    body = {**x, "cu_seqlens": [0, 50, 120], "causal": True, "weights_rows": [119, 0, 60]}
    r = post(client, "/v1/attention", body)
    assert r.status_code == 200, r.text
    got = r.json()
    assert set(got) >= {"output", "weights", "lse"}
    w, lse = decode(got["weights"]), decode(got["lse"])
    assert w.shape == (2, 3, 120) and lse.shape == (2, 3)
    want = service.attention(**x, cu_seqlens=[0, 50, 120], causal=True, weights_rows=[119, 0, 60])
    np.testing.assert_array_equal(decode(got["output"]).astype(np.float32), want.output)
    np.testing.assert_array_equal(w.astype(np.float32), want.weights)
    assert (w[:, 0, :50] == 0).all() and (w[:, 1, 50:] == 0).all()  # their own documents only


def test_multihead_weights_rows_and_packed(client) -> None:
    x = np.random.default_rng(5).standard_normal((1, 60, 16)).astype(np.float32)
    body = {"query": x, "num_heads": 4, "weights_rows": [59, 1], "cu_seqlens": [0, 20, 60],
            "average_weights": False}  # fmt: skip
    r = post(client, "/v1/multihead", body)
    assert r.status_code == 200, r.text
    got = r.json()
    want = service.multihead_attention(x, num_heads=4, weights_rows=[59, 1],
                                       cu_seqlens=[0, 20, 60], average_weights=False)  # fmt: skip
    assert decode(got["weights"]).shape == (1, 4, 2, 60)
    np.testing.assert_array_equal(decode(got["weights"]).astype(np.float32), want.weights)
    np.testing.assert_array_equal(decode(got["output"]).astype(np.float32), want.output)


def _ok() -> dict[str, Any]:
    return {n: a.tolist() for n, a in qkv(6, (40, 8)).items()}


def bm(block_size: Any, **kw: Any) -> dict[str, Any]:
    """Options with a block_mask of this block size (and layout or pattern)."""
    return {"block_mask": {"block_size": block_size, **kw}}


@pytest.mark.parametrize(
    ("change", "loc", "words"),
    [
        (bm(16, layout=[[True] * 5] * 5), ["block_mask", "layout"], "broadcastable"),
        (bm(16, layout=[[2, 0], [0, 1]]), ["block_mask", "layout"], "0 and 1"),
        (bm([16, 0], layout=[[True]]), ["block_mask", "block_size"], "between 1"),
        (bm(16), ["block_mask"], "exactly one"),
        (bm(16, pattern={"kind": "ring"}), ["block_mask", "pattern", "kind"], ""),
        ({"cu_seqlens": [0, 30, 20, 40]}, ["cu_seqlens"], "non-decreasing"),
        ({"cu_seqlens": [5, 40]}, ["cu_seqlens"], "start at 0"),
        (
            {"cu_seqlens": [0, 40], "global_tokens": [1], "window": {"left": 2}},
            ["global_tokens"],
            "cu_seqlens",
        ),
        ({"weights_rows": [0, 40]}, ["weights_rows"], "outside"),
        ({"weights_rows": [2, 2]}, ["weights_rows"], "twice"),
        ({"weights_rows": [1], "heatmap": True}, ["weights_rows"], "heatmap"),
    ],
)
def test_invalid_sparse_options_name_the_field(client, change, loc, words) -> None:
    body = assert_problem(post(client, "/v1/attention", {**_ok(), **change}), 422, loc)
    assert words.lower() in body["detail"].lower(), body
