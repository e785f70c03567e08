"""The sparse options on the Open Inference Protocol front, through the real tritonclient against
a real server: the input block_layout with parameters block_q / block_k, the INT32 / INT64 inputs
cu_seqlens, cu_seqlens_q, cu_seqlens_k and weights_rows. Answers equal /v1's for the same
options on the same server (tests/web/v1/test_sparse.py checks /v1 against the Python API, and
tests/core against the float64 reference); errors name the protocol's parameters and inputs."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.support.http import decode

SERVER_ENV = {"ATTN_MAX_ELEMENTS": "200000"}


def infer(
    tc: triton.InferenceServerClient,
    tensors: dict[str, np.ndarray],
    params: dict[str, Any] | None = None,
    outputs: tuple[str, ...] | None = None,
    model: str = "attention",
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The outputs (all returned ones when `outputs` is None) and their names, in order."""
    inputs = []
    for name, arr in tensors.items():
        t = triton.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inputs.append(t.set_data_from_numpy(arr))
    requested = None if outputs is None else [triton.InferRequestedOutput(n) for n in outputs]
    result = tc.infer(model, inputs, outputs=requested, parameters=params)
    names = [o["name"] for o in result.get_response()["outputs"]]
    return {n: result.as_numpy(n) for n in names}, names


def v1(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, np.ndarray]:
    r = http.post(path, content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    assert r.status_code == 200, r.text
    return {k: decode(v).astype(np.float32) for k, v in r.json().items() if k in ("output",
            "weights", "lse")}  # fmt: skip


def qkv(seed: int, shape: tuple[int, ...] = (1, 2, 96, 16)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(np.float32) for n in ("q", "k", "v")}


@pytest.mark.parametrize("dtype", [np.bool_, np.int32])
def test_block_layout_input_equals_v1_block_mask(tc, http, dtype) -> None:
    x = qkv(1)
    layout = np.random.default_rng(2).random((1, 2, 3, 4)) < 0.5  # ceil(96/32), ceil(96/24)
    got, _ = infer(
        tc, {**x, "block_layout": layout.astype(dtype)}, {"block_q": 32, "block_k": 24},
        outputs=("output", "weights"),
    )  # fmt: skip
    want = v1(http, "/v1/attention", {**x, "return_weights": True,
              "block_mask": {"block_size": [32, 24], "layout": layout}})  # fmt: skip
    np.testing.assert_array_equal(got["output"], want["output"])
    np.testing.assert_array_equal(got["weights"], want["weights"])


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_packed_documents_and_weights_rows(tc, http, dtype) -> None:
    x = {n: a[0] for n, a in qkv(3).items()}  # (H, L, D)
    cu = np.array([0, 30, 30, 96], dtype=dtype)
    rows = np.array([95, 0, 31], dtype=np.int64)
    got, names = infer(tc, {**x, "cu_seqlens": cu, "weights_rows": rows}, {"causal": True})
    assert names == ["output", "weights", "lse"]  # weights_rows brings its outputs
    assert got["weights"].shape == (2, 3, 96) and got["lse"].shape == (2, 3)
    want = v1(http, "/v1/attention", {**x, "cu_seqlens": cu.tolist(), "causal": True,
              "weights_rows": rows.tolist()})  # fmt: skip
    for name in names:
        np.testing.assert_array_equal(got[name], want[name])
    cross, _ = infer(tc, {**x, "cu_seqlens_q": cu, "cu_seqlens_k": np.array([0, 50, 60, 96])})
    want = v1(http, "/v1/attention", {**x, "cu_seqlens_q": cu.tolist(),
              "cu_seqlens_k": [0, 50, 60, 96]})  # fmt: skip
    np.testing.assert_array_equal(cross["output"], want["output"])


def test_multihead_takes_the_sparse_inputs(tc, http) -> None:
    query = np.random.default_rng(4).standard_normal((1, 64, 16)).astype(np.float32)
    layout = np.ones((1, 1, 2, 2), bool)
    layout[..., 0, 1] = False
    tensors = {"query": query, "block_layout": layout, "cu_seqlens": np.array([0, 20, 64]),
               "weights_rows": np.array([63, 5])}  # fmt: skip
    got, names = infer(tc, tensors, {"num_heads": 4, "block_q": 32}, model="multihead")
    assert names == ["output", "weights", "lse"] and got["weights"].shape == (1, 2, 64)
    want = v1(
        http,
        "/v1/multihead",
        {
            "query": query,
            "num_heads": 4,
            "cu_seqlens": [0, 20, 64],
            "weights_rows": [63, 5],
            "block_mask": {"block_size": 32, "layout": layout},
        },
    )
    np.testing.assert_array_equal(got["output"], want["output"])
    np.testing.assert_array_equal(got["weights"], want["weights"])


def layout(side: int, value: Any = True, dtype: Any = bool) -> dict[str, np.ndarray]:
    return {"block_layout": np.full((1, 1, side, side), value, dtype)}


@pytest.mark.parametrize(
    ("extra", "params", "fragments"),
    [
        (layout(3), {}, ("block_q", "required")),
        ({}, {"block_q": 32}, ("block_q", "block_layout")),
        (layout(5), {"block_q": 32}, ("block_layout", "broadcastable")),
        (layout(3), {"block_q": 0}, ("block_q", "between 1")),
        (layout(3, 2, np.int32), {"block_q": 32}, ("block_layout", "0 and 1")),
        ({"cu_seqlens": np.array([0, 50, 40, 96])}, {}, ("cu_seqlens", "non-decreasing")),
        ({"cu_seqlens": np.array([0, 90])}, {}, ("cu_seqlens", "packed length")),
        ({"cu_seqlens_q": np.array([0, 96])}, {}, ("cu_seqlens_k", "required")),
        ({"weights_rows": np.array([3, 3])}, {}, ("weights_rows", "twice")),
        ({"weights_rows": np.array([[1]])}, {}, ("weights_rows", "shape")),
        (
            {"cu_seqlens": np.array([0, 96])},
            {"global_tokens": "1", "window_left": 2},
            ("global_tokens", "cu_seqlens"),
        ),
    ],
)  # fmt: skip
def test_bad_sparse_inputs_name_them(tc, extra, params, fragments) -> None:
    x = {n: a[0] for n, a in qkv(5).items()}
    with pytest.raises(InferenceServerException) as info:
        infer(tc, {**x, **extra}, params)
    assert info.value.status() == "400"
    for fragment in fragments:
        assert fragment in info.value.message(), info.value.message()
