"""POST /v1/multihead in process: torch semantics, the Python API's exact results, limits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import service
from tests.support.http import assert_problem, b64, decode, post
from tests.support.reference import torch_mha

# Settings of this module's `client` fixture (tests/conftest.py).
APP_SETTINGS = {"max_elements": 100_000, "max_weight_elements": 50_000}


def weights(e: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        n: (rng.standard_normal((e, e)) / np.sqrt(e)).astype(np.float32)
        for n in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    w |= {
        n: (0.1 * rng.standard_normal(e)).astype(np.float32)
        for n in ("q_bias", "k_bias", "v_bias", "out_bias")
    }
    return w


def torch_reference(x: np.ndarray, w: dict[str, np.ndarray], num_heads: int, **kw: Any) -> Any:
    """torch.nn.MultiheadAttention (float64) self-attention of x with the weights w."""
    e = x.shape[-1]
    t = torch.from_numpy(x.astype(np.float64))
    with torch.no_grad():
        return torch_mha(service.MultiheadWeights(**w), e, num_heads, e, e)(t, t, t, **kw)


def test_matches_torch_multihead_attention_and_the_api(client) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    w = weights(16, 1)
    body = {
        "query": b64(x),
        "num_heads": 4,
        "weights": {n: b64(a) for n, a in w.items()},
        "need_weights": True,
    }
    r = post(client, "/v1/multihead", body)
    assert r.status_code == 200, r.text
    res = r.json()
    out_ref, w_ref = torch_reference(x, w, 4, need_weights=True, average_attn_weights=True)
    np.testing.assert_allclose(decode(res["output"]), out_ref.numpy(), atol=2e-5)
    np.testing.assert_allclose(decode(res["weights"]), w_ref.numpy(), atol=2e-6)
    api = service.multihead_attention(x, num_heads=4, weights=w, need_weights=True)
    np.testing.assert_array_equal(decode(res["output"]), api.output)
    np.testing.assert_array_equal(decode(res["weights"]), api.weights)
    np.testing.assert_array_equal(decode(res["lse"]), api.lse)
    assert res["meta"]["param_count"] == api.param_count == 4 * 16 * 16 + 4 * 16
    assert res["meta"]["shape"] == [2, 6, 16] and res["meta"]["flops"] == api.flops


def test_causal_mask_like_torch(client) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    w = weights(8, 2)
    r = post(
        client,
        "/v1/multihead",
        {
            "query": x.tolist(),
            "num_heads": 2,
            "causal": True,
            "weights": {n: a.tolist() for n, a in w.items()},
        },
    )
    assert r.status_code == 200, r.text
    attn_mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1)
    out_ref, _ = torch_reference(x, w, 2, attn_mask=attn_mask, need_weights=False)
    np.testing.assert_allclose(decode(r.json()["output"]), out_ref.numpy(), atol=2e-5)


def test_default_weights_come_from_the_seed(client) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8)).astype(np.float32)  # unbatched
    for seed in (0, 7):
        r = post(client, "/v1/multihead", {"query": b64(x), "num_heads": 2, "seed": seed})
        api = service.multihead_attention(x, num_heads=2, seed=seed)
        np.testing.assert_array_equal(decode(r.json()["output"]), api.output)
    a = post(client, "/v1/multihead", {"query": b64(x), "num_heads": 2, "seed": 0}).json()
    b = post(client, "/v1/multihead", {"query": b64(x), "num_heads": 2, "seed": 7}).json()
    assert not np.array_equal(decode(a["output"]), decode(b["output"]))


def test_cross_attention_gqa_and_per_head_weights(client) -> None:
    rng = np.random.default_rng(4)
    query = rng.standard_normal((1, 3, 8)).astype(np.float32)
    key = rng.standard_normal((1, 5, 6)).astype(np.float32)
    value = rng.standard_normal((1, 5, 4)).astype(np.float32)
    body = {
        "query": b64(query),
        "key": b64(key),
        "value": b64(value),
        "num_heads": 4,
        "num_kv_heads": 2,
        "need_weights": True,
        "average_weights": False,
        "seed": 3,
    }
    res = post(client, "/v1/multihead", body).json()
    api = service.multihead_attention(
        query,
        key,
        value,
        num_heads=4,
        num_kv_heads=2,
        need_weights=True,
        average_weights=False,
        seed=3,
    )
    np.testing.assert_array_equal(decode(res["output"]), api.output)
    assert decode(res["weights"]).shape == (1, 4, 3, 5)
    np.testing.assert_array_equal(decode(res["weights"]), api.weights)


def test_heatmaps_per_head_mean_and_grid_keep_the_averaged_weights(client) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    body = {"query": b64(x), "num_heads": 2, "need_weights": True, "heatmap": {"batch": 1}}
    res = post(client, "/v1/multihead", body).json()
    heads = [(h["batch"], h["head"]) for h in res["heatmaps"]]
    assert heads == [(1, 0), (1, 1), (1, "mean"), (1, "all")]
    api = service.multihead_attention(x, num_heads=2, need_weights=True)
    np.testing.assert_array_equal(decode(res["weights"]), api.weights)  # still averaged
    for h in res["heatmaps"]:
        png = client.get(h["url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("change", "loc", "status"),
    [
        ({"num_heads": 3}, ["num_heads"], 422),
        ({"num_heads": 0}, ["num_heads"], 422),
        ({"num_kv_heads": 3, "num_heads": 2}, ["num_kv_heads"], 422),
        ({"weights": {"q_proj": [[1.0]]}}, ["weights", "k_proj"], 422),
        ({"key": [[[1.0] * 8]] * 2}, ["key"], 422),
        ({"value": [[[1.0] * 8] * 2]}, ["value"], 422),
        ({"seed": -1}, ["seed"], 422),
        ({"query": [[[float("nan")] * 8]]}, ["query"], 422),
        ({"query": None}, ["query"], 422),
        ({"average_weights": "x"}, ["average_weights"], 422),
        ({"heatmap": {"batch": 5}}, ["heatmap", "batch"], 422),
        ({"heatmap": {"heads": [7]}}, ["heatmap", "heads"], 422),
        ({"heatmap": {"tokens": ["a"]}}, ["heatmap", "tokens"], 422),
    ],
)
def test_invalid_input_names_the_field(client, change: dict, loc: list, status: int) -> None:
    x = np.ones((1, 3, 8), np.float32).tolist()
    r = post(client, "/v1/multihead", {"query": x, "num_heads": 2, **change})
    assert_problem(r, status, loc)


def test_nan_in_given_weights_is_named(client) -> None:
    w = weights(8, 6)
    w["v_proj"][0, 0] = np.nan
    body = {
        "query": b64(np.ones((1, 3, 8), np.float32)),
        "num_heads": 2,
        "weights": {n: b64(a) for n, a in w.items()},
    }
    assert_problem(post(client, "/v1/multihead", body), 422, ["weights", "v_proj"])


def test_weight_limits_are_413_before_any_allocation(client) -> None:
    # E = 200 implies 4 * 200^2 = 160,000 weights > 50,000: refused before Xavier init.
    x = np.ones((1, 2, 200), np.float32)
    body = assert_problem(
        post(client, "/v1/multihead", {"query": b64(x), "num_heads": 2}), 413, ["weights"]
    )
    assert "ATTN_MAX_WEIGHT_ELEMENTS" in body["detail"]
    # Per-head weights beyond ATTN_MAX_ELEMENTS (2 x 4 x 200 x 200 = 320,000 > 100,000).
    q = np.ones((2, 200, 8), np.float32)
    r = post(
        client,
        "/v1/multihead",
        {"query": b64(q), "num_heads": 4, "need_weights": True, "average_weights": False},
    )
    assert_problem(r, 413, ["key"])
