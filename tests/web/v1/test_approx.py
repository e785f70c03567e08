"""POST /v1/attention with an approximate `method`: dispatch, 422s naming both, and "compare"."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from service.core import approx
from service.core.options import AttentionOptions
from tests.support.http import assert_problem, b64, decode, post
from tests.support.images import png_size
from tests.support.reference import random_qkv, reference_attention


def qkv(b: int, h: int, lq: int, lk: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    return random_qkv(b, h, h, lq, lk, 8, seed=seed)


def body(q: np.ndarray, k: np.ndarray, v: np.ndarray, **options: Any) -> dict[str, Any]:
    return {"q": b64(q), "k": b64(k), "v": b64(v), **options}


def test_method_dispatch(client: Any) -> None:
    q, k, v = qkv(1, 2, 20, 20)
    r = post(client, "/v1/attention", body(q, k, v, method="performer", causal=True, seed=3))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["meta"]["method"] == "performer" and "comparison" not in got
    want = approx.run(q, k, v, AttentionOptions(method="performer", causal=True, seed=3)).output
    np.testing.assert_allclose(decode(got["output"]), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options, loc",
    [
        ({"method": "linformer", "causal": True}, ["causal"]),
        ({"method": "linear", "window": {"left": 2, "dilation": 2}}, ["window", "dilation"]),
        ({"method": "linear", "num_features": 8}, ["num_features"]),
        ({"compare": True}, ["compare"]),
    ],
)
def test_unsupported_is_422_naming_both(client: Any, options: dict[str, Any], loc: list) -> None:
    q, k, v = qkv(1, 1, 6, 6)
    problem = assert_problem(post(client, "/v1/attention", body(q, k, v, **options)), 422, loc)
    assert repr(options.get("method", "exact")) in problem["detail"]


def test_compare_returns_errors_maps_and_three_panel_heatmaps(client: Any) -> None:
    q, k, v = qkv(2, 2, 30, 30, seed=5)
    r = post(
        client,
        "/v1/attention",
        body(
            q,
            k,
            v,
            method="linear",
            causal=True,
            compare=True,
            heatmap={"batch": 1, "heads": [0, 1], "inline": True},
        ),
    )
    assert r.status_code == 200, r.text
    got = r.json()
    cmp = got["comparison"]
    exact = reference_attention(q, k, v, causal=True)
    out = decode(got["output"])
    rel = np.linalg.norm(out - exact.output.numpy()) / np.linalg.norm(exact.output.numpy())
    assert cmp["method"] == "linear" and not cmp["pooled"]
    np.testing.assert_allclose(cmp["rel_error"], rel, rtol=1e-4)
    np.testing.assert_allclose(decode(cmp["exact_map"]), exact.weights.numpy(), atol=1e-5)
    implied = decode(cmp["implied_map"])
    assert implied.shape == (2, 2, 30, 30)
    np.testing.assert_allclose(implied.sum(-1), 1.0, atol=1e-5)  # probabilities per row
    assert np.triu(implied, 1).max() == 0.0  # causal: nothing above the diagonal
    assert decode(cmp["rel_error_per_head"]).shape == (2, 2)
    images = got["heatmaps"]
    assert [(im["batch"], im["head"]) for im in images] == [(1, 0), (1, 1)]
    assert png_size(base64.b64decode(images[0]["png"])) == (1560, 480)  # three panels


def test_compare_long_sequence_is_pooled(client: Any) -> None:
    q, k, v = qkv(1, 1, 700, 900, seed=2)
    opts = {"method": "performer", "compare": True, "heatmap": {"inline": True}}
    r = post(client, "/v1/attention", body(q, k, v, **opts))
    assert r.status_code == 200, r.text
    cmp = r.json()["comparison"]
    assert cmp["pooled"]
    implied, exact = decode(cmp["implied_map"]), decode(cmp["exact_map"])
    assert implied.shape == exact.shape == (1, 1, approx.MAP_SIDE, approx.MAP_SIDE)
    # a bin holds 2-4 cells of the 700 x 900 map; its mean times the bin's keys sums to ~1
    widths = np.diff(approx.bin_edges(900, approx.MAP_SIDE))
    np.testing.assert_allclose((exact * widths).sum(-1), 1.0, atol=1e-4)
    assert len(r.json()["heatmaps"]) == 1
    labelled = dict(opts, heatmap={"tokens": [f"t{i}" for i in range(900)]})
    assert_problem(
        post(client, "/v1/attention", body(q, k, v, **labelled)), 422, ["heatmap", "tokens"]
    )
