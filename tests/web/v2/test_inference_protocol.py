"""The Open Inference Protocol front (/v2), through the real tritonclient, against a real server.

The server is started as `make run` starts it (the console script) on a free port. Results are
compared with what /v1 answers for the same inputs on the same server (both fronts run the
same jobs on one scheduler), and a few with independent float64 torch references. A few cases
that need a particular configuration (body limit, a full compute queue) run in process.
"""

from __future__ import annotations

import dataclasses
import gzip
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import ml_dtypes
import numpy as np
import orjson
import pytest
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

import service
from service.core.weights import expected_shapes
from service.web.v2 import models
from tests.support.http import app_client, b64, bfloat16_round, decode
from tests.support.reference import reference_attention

MAX_ELEMENTS = 200_000
# The `server` fixture's environment (tests/conftest.py).
SERVER_ENV = {"ATTN_MAX_ELEMENTS": str(MAX_ELEMENTS)}
HEADER = "Inference-Header-Content-Length"


# ---------------------------------------------------------------------------------------------
# Helpers


def tensor(name: str, arr: np.ndarray, binary: bool = True) -> triton.InferInput:
    t = triton.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    return t.set_data_from_numpy(arr, binary_data=binary)


def v2_infer(
    tc: triton.InferenceServerClient,
    model: str,
    tensors: dict[str, np.ndarray],
    params: dict[str, Any] | None = None,
    outputs: tuple[str, ...] = ("output",),
    binary: bool = True,
) -> dict[str, np.ndarray]:
    result = tc.infer(
        model,
        [tensor(n, a, binary) for n, a in tensors.items()],
        outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in outputs],
        parameters=params,
    )
    return {n: result.as_numpy(n) for n in outputs}


def v1_post(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, content=orjson.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def v1_arrays(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: decode(doc[k]) for k in ("output", "weights", "lse") if doc.get(k) is not None}


def assert_same(v2: dict[str, np.ndarray], v1: dict[str, np.ndarray]) -> None:
    for name, got in v2.items():
        assert got.dtype == np.float32, name
        np.testing.assert_array_equal(got, v1[name], err_msg=name)


def qkv(seed: int = 0) -> dict[str, np.ndarray]:
    """Batched grouped-query tensors: q (2, 4, 6, 8), k and v (2, 2, 9, 8), Lq != Lk."""
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((2, 4, 6, 8)).astype(np.float32),
        "k": rng.standard_normal((2, 2, 9, 8)).astype(np.float32),
        "v": rng.standard_normal((2, 2, 9, 8)).astype(np.float32),
    }


def raw_infer(
    http: httpx.Client,
    header: dict[str, Any] | bytes,
    binary: bytes = b"",
    header_length: str | None = None,
    model: str = "attention",
) -> httpx.Response:
    """POST a hand-made body: the JSON header, then `binary` (with the length header if any)."""
    head = header if isinstance(header, bytes) else orjson.dumps(header)
    headers = {"content-type": "application/octet-stream" if binary else "application/json"}
    if binary or header_length is not None:
        headers[HEADER] = header_length if header_length is not None else str(len(head))
    return http.post(f"/v2/models/{model}/infer", content=head + binary, headers=headers)


def json_input(name: str, arr: np.ndarray, datatype: str = "FP32", nested: bool = False) -> dict:
    data = arr.tolist() if nested else arr.ravel().tolist()
    return {"name": name, "shape": list(arr.shape), "datatype": datatype, "data": data}


def assert_error(r: httpx.Response, status: int, *fragments: str) -> str:
    """A protocol error: this status, JSON {"error": message} naming each fragment."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"}, body
    for fragment in fragments:
        assert fragment in body["error"], (fragment, body["error"])
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Health and metadata


def test_server_metadata_lists_the_binary_extension(tc, http) -> None:
    meta = tc.get_server_metadata()
    assert meta["name"] and meta["version"]
    assert "binary_tensor_data" in meta["extensions"]
    assert http.get("/v2").json() == meta


def test_liveness_and_readiness(tc, http) -> None:
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready("attention") and tc.is_model_ready("multihead")
    assert tc.is_model_ready("attention", "1")
    assert not tc.is_model_ready("nope")
    assert not tc.is_model_ready("attention", "2")
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/attention/ready"):
        r = http.get(path)
        assert r.status_code == 200 and r.content == b""  # the protocol's empty body
    assert_error(http.get("/v2/models/nope/ready"), 404, "nope")


def test_model_metadata(tc) -> None:
    meta = tc.get_model_metadata("attention")
    assert meta["name"] == "attention" and meta["versions"] == ["1"]
    inputs = {t["name"]: t for t in meta["inputs"]}
    assert list(inputs) == [
        "q", "k", "v", "mask", "key_lengths",
        "block_layout", "cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "weights_rows",
    ]  # fmt: skip
    assert inputs["q"] == {"name": "q", "datatype": "FP32", "shape": [-1, -1, -1, -1]}
    assert inputs["mask"]["datatype"] == "BOOL" and inputs["key_lengths"]["shape"] == [-1]
    assert inputs["block_layout"]["datatype"] == "BOOL"
    assert inputs["cu_seqlens"]["datatype"] == inputs["weights_rows"]["datatype"] == "INT64"
    outputs = {t["name"]: t for t in meta["outputs"]}
    assert list(outputs) == ["output", "weights", "lse", "slot_weights"]
    assert all(d == -1 for t in meta["inputs"] + meta["outputs"] for d in t["shape"])
    assert tc.get_model_metadata("attention", "1") == meta

    mh = tc.get_model_metadata("multihead")
    names = [t["name"] for t in mh["inputs"]]
    assert names[:3] == ["query", "key", "value"]
    assert {"q_proj", "k_proj", "v_proj", "out_proj", "out_bias", "mask", "key_lengths"} <= set(
        names
    )
    assert {"block_layout", "cu_seqlens", "cu_seqlens_q", "cu_seqlens_k", "weights_rows"} <= set(
        names
    )
    assert [t["name"] for t in mh["outputs"]] == ["output", "weights", "lse"]


def test_unknown_model_is_404_everywhere(tc, http) -> None:
    with pytest.raises(InferenceServerException) as info:
        tc.get_model_metadata("nope")
    assert info.value.status() == "404" and "nope" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        tc.infer("nope", [tensor("q", np.zeros((2, 2), np.float32))])
    assert info.value.status() == "404" and "attention, multihead" in info.value.message()
    assert_error(http.get("/v2/models/attention/versions/7"), 404, "version '7'")
    assert_error(http.get("/v2/no/such/path"), 404, "/v2/no/such/path")
    assert_error(http.get("/v2/models/attention/infer"), 405, "GET")


def test_v1_errors_stay_problem_documents(http) -> None:
    r = http.get("/v1/nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_openapi_documents_the_v2_routes(http) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert {"/v2", "/v2/health/ready", "/v2/models/{model_name}"} <= set(paths)


# ---------------------------------------------------------------------------------------------
# attention: every option, JSON and binary, equal to /v1/attention


# (id, v2 parameters, v2 extra inputs, v1 options); the extra inputs see (B, Hq, Lq, Lk).
def _bool_mask(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(5).random(shape) > 0.3


_FLOAT_MASK = np.random.default_rng(6).standard_normal((6, 9)).astype(np.float32)
_BOOL_MASK = _bool_mask((2, 1, 6, 9))
_SLOPES = [0.5, 0.25, 0.125, 0.0625]

CASES: list[tuple[str, dict, dict, dict]] = [
    ("plain", {}, {}, {}),
    ("causal", {"causal": True}, {}, {"causal": True}),
    (
        "bottom_right_scale_softcap",
        {"causal": "bottom_right", "scale": 0.3, "softcap": 4.0},
        {},
        {"causal": "bottom_right", "scale": 0.3, "softcap": 4.0},
    ),
    (
        "window_dilation_global",
        {"window_left": 3, "window_right": 1, "dilation": 2, "global_tokens": "0,4"},
        {},
        {"window": {"left": 3, "right": 1, "dilation": 2}, "global_tokens": [0, 4]},
    ),
    ("alibi_list", {"alibi_slopes": "0.5, 0.25, 0.125, 0.0625"}, {}, {"alibi_slopes": _SLOPES}),
    ("alibi_standard", {"alibi_slopes": True}, {}, {"alibi_slopes": True}),
    (
        "bool_mask_ignore",
        {"mask_convention": "ignore"},
        {"mask": _BOOL_MASK},
        {"mask": b64(_BOOL_MASK), "mask_convention": "ignore"},
    ),
    ("float_mask", {}, {"mask": _FLOAT_MASK}, {"mask": b64(_FLOAT_MASK)}),
    (
        "key_lengths_int32",
        {"causal": True},
        {"key_lengths": np.array([5, 9], np.int32)},
        {"causal": True, "key_lengths": [5, 9]},
    ),
    (
        "empty_rows_nan",
        {"empty_rows": "nan"},
        {"key_lengths": np.array([0, 7], np.int64)},
        {"empty_rows": "nan", "key_lengths": [0, 7]},
    ),
]


def _v1_attention(http: httpx.Client, x: dict[str, np.ndarray], options: dict) -> dict:
    body = {n: b64(a) for n, a in x.items()} | options
    return v1_post(http, "/v1/attention", body | {"return_weights": True, "encoding": "b64"})


@pytest.mark.parametrize(
    ("name", "params", "extra", "v1_options"), CASES, ids=[c[0] for c in CASES]
)
def test_binary_attention_equals_v1(tc, http, name, params, extra, v1_options) -> None:
    x = qkv(1)
    got = v2_infer(tc, "attention", x | extra, params, ("output", "weights", "lse"))
    assert got["output"].shape == (2, 4, 6, 8) and got["weights"].shape == (2, 4, 6, 9)
    assert got["lse"].shape == (2, 4, 6)
    assert_same(got, v1_arrays(_v1_attention(http, x, v1_options)))
    if name == "empty_rows_nan":  # binary outputs carry what JSON cannot: NaN and -inf
        assert np.isnan(got["output"][0]).all() and np.isneginf(got["lse"][0]).all()


def test_json_inputs_and_outputs_equal_v1(tc, http) -> None:
    """JSON both ways, the optional BOOL mask and INT64 key_lengths included."""
    x = qkv(2)
    extra = {"mask": _BOOL_MASK, "key_lengths": np.array([9, 6], np.int64)}
    got = v2_infer(
        tc, "attention", x | extra, {"causal": True}, ("output", "weights", "lse"), binary=False
    )
    expected = _v1_attention(
        http, x, {"causal": True, "mask": b64(_BOOL_MASK), "key_lengths": [9, 6]}
    )
    assert_same(got, v1_arrays(expected))


def test_nested_and_flat_json_data_are_the_same(http) -> None:
    x = qkv(3)
    answers = []
    for nested in (False, True):
        doc = {"inputs": [json_input(n, a, nested=nested) for n, a in x.items()]}
        r = raw_infer(http, doc)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        answers.append(np.array(out["data"], np.float32).reshape(out["shape"]))
    expected = v1_arrays(_v1_attention(http, x, {}))["output"]
    np.testing.assert_array_equal(answers[0], expected)
    np.testing.assert_array_equal(answers[1], expected)


@pytest.mark.parametrize("dtype", ["float16", "float64", "bfloat16"])
def test_other_float_datatypes_equal_v1(tc, http, dtype: str) -> None:
    x = qkv(4)
    if dtype == "bfloat16":  # values bfloat16 holds exactly, so both fronts get the same ones
        v2_x = {n: bfloat16_round(a).astype(ml_dtypes.bfloat16) for n, a in x.items()}
        v1_x = {n: b64(bfloat16_round(a), "bfloat16") for n, a in x.items()}
    else:
        v2_x = {n: a.astype(dtype) for n, a in x.items()}
        v1_x = {n: b64(a.astype(dtype)) for n, a in x.items()}
    expected = v1_arrays(v1_post(http, "/v1/attention", v1_x | {"encoding": "b64"}))
    assert_same(v2_infer(tc, "attention", v2_x), expected)
    if dtype != "bfloat16":  # BF16 travels only as binary data
        assert_same(v2_infer(tc, "attention", v2_x, binary=False), expected)


@pytest.mark.parametrize("rank", [2, 3])
def test_lower_ranks_keep_their_rank(tc, http, rank: int) -> None:
    x = {n: a[(0,) * (4 - rank)] for n, a in qkv(5).items()}
    x["q"] = x["q"][..., :2, :, :] if rank == 3 else x["q"]  # Hq a multiple of Hkv
    got = v2_infer(tc, "attention", x, {"causal": True}, ("output", "weights", "lse"))
    assert got["output"].ndim == rank
    assert_same(got, v1_arrays(_v1_attention(http, x, {"causal": True})))


def test_output_matches_an_independent_float64_reference(tc) -> None:
    x = qkv(6)
    params = {"window_left": 2, "window_right": 0, "softcap": 3.0}
    got = v2_infer(tc, "attention", x, params, ("output", "weights"))
    ref = reference_attention(x["q"], x["k"], x["v"], window={"left": 2, "right": 0}, softcap=3.0)
    np.testing.assert_allclose(got["output"], ref.output.numpy(), atol=2e-5)
    np.testing.assert_allclose(got["weights"], ref.weights.numpy(), atol=2e-6)


def test_approximate_method_equals_v1(tc, http) -> None:
    x = qkv(7)
    params = {"method": "performer", "num_features": 32, "seed": 3}
    got = v2_infer(tc, "attention", x, params)
    expected = v1_post(http, "/v1/attention", {n: b64(a) for n, a in x.items()} | params)
    assert_same(got, v1_arrays(expected))


def test_compare_reports_the_error_in_the_response_parameters(tc) -> None:
    """The comparison's scalars travel as response parameters (its maps only through /v1)."""
    x = qkv(13)
    params = {"method": "performer", "num_features": 32, "seed": 1, "compare": True}
    result = tc.infer("attention", [tensor(n, a) for n, a in x.items()], parameters=params)
    got = result.get_response()["parameters"]
    # The Python API in this process (its thread count may differ from the server's).
    expected = service.attention(x["q"], x["k"], x["v"], **params)
    assert got["compare_method"] == "performer"
    assert got["compare_rel_error"] == pytest.approx(expected.comparison["rel_error"], rel=1e-5)
    assert got["compare_max_abs_error"] == pytest.approx(
        expected.comparison["max_abs_error"], rel=1e-5
    )
    np.testing.assert_allclose(result.as_numpy("output"), expected.output, rtol=1e-5, atol=1e-6)


def test_default_outputs_ids_and_response_parameters(tc, http) -> None:
    """No outputs listed: `output`, plus weights and lse with return_weights; id echoed."""
    x = qkv(8)
    result = tc.infer(
        "attention",
        [tensor(n, a) for n, a in x.items()],
        request_id="req-17",
        parameters={"return_weights": True},
    )
    response = result.get_response()
    assert response["id"] == "req-17" and response["model_name"] == "attention"
    assert [o["name"] for o in response["outputs"]] == ["output", "weights", "lse"]
    v1 = _v1_attention(http, x, {})
    assert_same({n: result.as_numpy(n) for n in ("output", "weights", "lse")}, v1_arrays(v1))
    params = response["parameters"]
    assert params["flops"] == v1["meta"]["flops"] and params["method"] == "exact"
    assert params["elapsed_ms"] >= 0
    # Without return_weights only `output` comes back.
    plain = tc.infer("attention", [tensor(n, a) for n, a in x.items()]).get_response()
    assert [o["name"] for o in plain["outputs"]] == ["output"]


def test_mixed_binary_and_json_outputs(http) -> None:
    """Per-output binary_data: JSON `data` for one output, raw bytes for another."""
    x = qkv(9)
    q = x["q"]
    doc = {
        "inputs": [
            {"name": "q", "shape": list(q.shape), "datatype": "FP32",
             "parameters": {"binary_data_size": q.nbytes}},
            json_input("k", x["k"]),
            json_input("v", x["v"]),
        ],
        "outputs": [
            {"name": "weights", "parameters": {"binary_data": True}},
            {"name": "output"},
        ],
    }  # fmt: skip
    r = raw_infer(http, doc, q.tobytes())
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    n = int(r.headers[HEADER])
    head = orjson.loads(r.content[:n])
    weights_meta, output_meta = head["outputs"]
    assert weights_meta["name"] == "weights" and "data" not in weights_meta
    size = weights_meta["parameters"]["binary_data_size"]
    assert size == len(r.content) - n
    weights = np.frombuffer(r.content[n:], "<f4").reshape(weights_meta["shape"])
    output = np.array(output_meta["data"], np.float32).reshape(output_meta["shape"])
    expected = v1_arrays(_v1_attention(http, x, {}))
    np.testing.assert_array_equal(weights, expected["weights"])
    np.testing.assert_array_equal(output, expected["output"])


def test_compressed_request_and_response(tc, http) -> None:
    x = qkv(10)
    inputs = [tensor(n, a) for n, a in x.items()]
    expected = v1_arrays(_v1_attention(http, x, {}))
    for algorithm in ("gzip", "deflate"):
        for binary in (False, True):
            result = tc.infer(
                "attention",
                inputs,
                outputs=[triton.InferRequestedOutput("output", binary_data=binary)],
                request_compression_algorithm=algorithm,
                response_compression_algorithm=algorithm,
            )
            np.testing.assert_array_equal(result.as_numpy("output"), expected["output"])
    # JSON answers are compressed when accepted; binary ones (float bytes) are not.
    doc = _doc(*(json_input(n, a) for n, a in x.items()))
    r = http.post("/v2/models/attention/infer", json=doc, headers={"accept-encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip" and r.json()["outputs"][0]["name"] == "output"
    doc["parameters"] = {"binary_data_output": True}
    r = http.post("/v2/models/attention/infer", json=doc, headers={"accept-encoding": "gzip"})
    assert "content-encoding" not in r.headers and HEADER in r.headers


def test_heatmap_urls_in_the_response_parameters(tc, http) -> None:
    x = qkv(11)
    result = tc.infer(
        "attention",
        [tensor(n, a) for n, a in x.items()],
        parameters={"heatmap": True, "heatmap_batch": 1, "heatmap_heads": "0,2"},
    )
    params = result.get_response()["parameters"]
    urls = {k: v for k, v in params.items() if k.startswith("heatmap_")}
    assert set(urls) == {"heatmap_b1_h0", "heatmap_b1_h2", "heatmap_b1_all"}
    v1 = _v1_attention(http, x, {"heatmap": {"batch": 1, "heads": [0, 2]}})
    assert {(m["batch"], m["head"]) for m in v1["heatmaps"]} == {(1, 0), (1, 2), (1, "all")}
    for url in urls.values():
        r = http.get(url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_long_heatmaps_are_pooled_like_v1(tmp_path: Path) -> None:
    # Beyond ATTN_HEATMAP_MAX_SIDE both fronts pool the exact map (one shared job) instead of
    # refusing; the images are drawn from the same pooled map, so they are byte-identical.
    from tests.support.http import app_client

    rng = np.random.default_rng(12)
    x = {n: rng.standard_normal((40, 8), dtype=np.float32) for n in ("q", "k", "v")}
    with app_client(tmp_path, heatmap_max_side=16) as c:
        body = {
            "inputs": [json_input(n, a) for n, a in x.items()],
            "parameters": {"heatmap": True},
        }
        r = c.post("/v2/models/attention/infer", json=body)
        assert r.status_code == 200, r.text
        urls = [v for k, v in r.json()["parameters"].items() if k.startswith("heatmap_")]
        v1 = c.post("/v1/attention", json={n: a.tolist() for n, a in x.items()} | {"heatmap": True})
        assert v1.status_code == 200, v1.text
        assert len(urls) == 1 and len(v1.json()["heatmaps"]) == 1
        v2_png = c.get(urls[0])
        v1_png = c.get(v1.json()["heatmaps"][0]["url"])
        assert v2_png.status_code == 200 and v2_png.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert v2_png.content == v1_png.content


# ---------------------------------------------------------------------------------------------
# multihead: equal to /v1/multihead and to torch.nn.MultiheadAttention


def _projections(e: int, kv: int, kdim: int, vdim: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(e, kv, kdim, vdim)  # torch's layout, every weight and bias
    return {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in shapes.items()}


def test_multihead_with_weights_equals_v1(tc, http) -> None:
    """Cross attention, grouped-query heads, given projections, per-head weights."""
    rng = np.random.default_rng(12)
    query = rng.standard_normal((2, 5, 16)).astype(np.float32)
    key = rng.standard_normal((2, 7, 12)).astype(np.float32)
    value = rng.standard_normal((2, 7, 20)).astype(np.float32)
    w = _projections(16, 8, 12, 20, seed=13)
    mask = _bool_mask((2, 1, 1, 7))
    params = {"num_heads": 4, "num_kv_heads": 2, "average_weights": False, "causal": True}
    got = v2_infer(
        tc,
        "multihead",
        {"query": query, "key": key, "value": value, "mask": mask} | w,
        params,
        ("output", "weights", "lse"),
    )
    assert got["weights"].shape == (2, 4, 5, 7)
    body = {"query": b64(query), "key": b64(key), "value": b64(value), "mask": b64(mask)}
    body |= params | {"weights": {n: b64(a) for n, a in w.items()}}
    expected = v1_post(http, "/v1/multihead", body | {"need_weights": True, "encoding": "b64"})
    assert_same(got, v1_arrays(expected))


def test_multihead_seeded_self_attention_equals_v1(tc, http) -> None:
    """Only `query`; Xavier weights from the seed; need_weights adds the averaged weights."""
    query = np.random.default_rng(14).standard_normal((2, 6, 16)).astype(np.float32)
    params = {"num_heads": 2, "seed": 5, "need_weights": True}
    result = tc.infer(
        "multihead",
        [tensor("query", query), tensor("key_lengths", np.array([6, 4], np.int32))],
        parameters=params,
    )
    got = {n: result.as_numpy(n) for n in ("output", "weights", "lse")}
    assert got["weights"].shape == (2, 6, 6)
    assert result.get_response()["parameters"]["param_count"] == 4 * 16 * 16 + 4 * 16
    body = {"query": b64(query), "key_lengths": [6, 4], "encoding": "b64"} | params
    assert_same(got, v1_arrays(v1_post(http, "/v1/multihead", body)))


def test_multihead_matches_torch(tc) -> None:
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    w = _projections(16, 16, 16, 16, seed=16)
    got = v2_infer(tc, "multihead", {"query": x} | w, {"num_heads": 4}, ("output", "weights"))
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True, dtype=torch.float64)
    t = lambda a: torch.from_numpy(a.astype(np.float64))  # noqa: E731
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([t(w["q_proj"]), t(w["k_proj"]), t(w["v_proj"])]))
        mha.in_proj_bias.copy_(torch.cat([t(w["q_bias"]), t(w["k_bias"]), t(w["v_bias"])]))
        mha.out_proj.weight.copy_(t(w["out_proj"]))
        mha.out_proj.bias.copy_(t(w["out_bias"]))
        out, weights = mha(t(x), t(x), t(x), need_weights=True)
    np.testing.assert_allclose(got["output"], out.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["weights"], weights.numpy(), atol=1e-5)


def test_multihead_heatmaps(tc, http) -> None:
    query = np.random.default_rng(17).standard_normal((1, 4, 8)).astype(np.float32)
    result = tc.infer(
        "multihead",
        [tensor("query", query)],
        parameters={"num_heads": 2, "heatmap": True, "heatmap_heads": "mean"},
    )
    params = result.get_response()["parameters"]
    assert [k for k in params if k.startswith("heatmap_")] == ["heatmap_b0_mean"]
    assert http.get(params["heatmap_b0_mean"]).headers["content-type"] == "image/png"


# ---------------------------------------------------------------------------------------------
# Bad requests: a clear {"error"} naming what is wrong, never a 500


def _q_binary() -> tuple[dict[str, Any], bytes]:
    """A request header whose q travels as binary, and the bytes of q, k and v."""
    x = qkv(20)
    header = {
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": "FP32",
             "parameters": {"binary_data_size": a.nbytes}}
            for n, a in x.items()
        ]
    }  # fmt: skip
    return header, b"".join(a.tobytes() for a in x.values())


def test_malformed_binary_body(http) -> None:
    header, data = _q_binary()
    # A binary section shorter than the inputs claim.
    assert_error(raw_infer(http, header, data[:-10]), 400, "'v'", "binary_data_size")
    # Bytes that no input claims.
    assert_error(raw_infer(http, header, data + b"\0" * 8), 400, "8 bytes")
    # binary_data_size that does not match the shape.
    header["inputs"][0]["parameters"]["binary_data_size"] = 12
    assert_error(raw_infer(http, header, data), 400, "'q'", "needs 1536")
    # Binary data without the header that says where the JSON ends.
    head, _ = _q_binary()
    r = http.post("/v2/models/attention/infer", content=orjson.dumps(head) + data)
    assert_error(r, 400, "JSON")


def test_header_length_larger_than_the_body(http) -> None:
    header, data = _q_binary()
    head = orjson.dumps(header)
    total = len(head) + len(data)
    r = raw_infer(http, head, data, header_length=str(total + 1))
    assert_error(r, 400, HEADER, f"only {total} bytes")
    assert_error(raw_infer(http, head, data, header_length="12abc"), 400, HEADER, "integer")
    assert_error(raw_infer(http, head, data, header_length="-3"), 400, HEADER)
    # A length that cuts the JSON short.
    assert_error(raw_infer(http, head, data, header_length=str(len(head) - 5)), 400, "JSON")


def _doc(*inputs: dict, **extra: Any) -> dict[str, Any]:
    return {"inputs": list(inputs), **extra}


_X = qkv(21)
_Q, _K, _V = (json_input(n, a) for n, a in _X.items())

BAD_REQUESTS: list[tuple[str, Any, int, tuple[str, ...]]] = [
    ("not_json", b"{nope", 400, ("JSON",)),
    ("not_an_object", b"[1, 2]", 400, ("object",)),
    ("no_inputs_field", {"id": "1"}, 400, ("inputs",)),
    ("unknown_field", _doc(_Q, _K, _V, colour="red"), 400, ("colour",)),
    ("missing_input", _doc(_Q, _K), 400, ("missing", "v")),
    ("unknown_input", _doc(_Q, _K, _V, json_input("z", _X["q"])), 400, ("'z'", "q, k, v")),
    ("twice", _doc(_Q, _K, _V, _V), 400, ("'v'", "twice")),
    ("datatype", _doc(_Q | {"datatype": "BYTES"}, _K, _V), 400, ("'q'", "BYTES", "FP32")),
    ("int_q", _doc(_Q | {"datatype": "INT32"}, _K, _V), 400, ("'q'", "INT32")),
    ("count", _doc(_Q | {"data": [1.0, 2.0]}, _K, _V), 400, ("'q'", "2 values", "384")),
    ("ragged", _doc(_Q | {"shape": [2, 2], "data": [[1.0], [2.0, 3.0]]}, _K, _V), 400, ("'q'",)),
    ("strings", _doc(_Q | {"shape": [1], "data": ["x"]}, _K, _V), 400, ("'q'", "numbers")),
    ("no_data", _doc({k: v for k, v in _Q.items() if k != "data"}, _K, _V), 400, ("'q'",)),
    ("negative_dim", _doc(_Q | {"shape": [-2, 3]}, _K, _V), 400, ("shape",)),
    ("bf16_json", _doc(_Q | {"datatype": "BF16"}, _K, _V), 400, ("BF16", "binary")),
    (
        "bool_values",
        _doc(_Q, _K, _V, {"name": "mask", "shape": [2], "datatype": "BOOL", "data": [0, 2]}),
        400,
        ("'mask'", "true/false"),
    ),
    (
        "fractional_lengths",
        _doc(
            _Q, _K, _V, {"name": "key_lengths", "shape": [2], "datatype": "INT64", "data": [1.5, 2]}
        ),
        400,
        ("'key_lengths'", "whole"),
    ),  # fmt: skip
    (
        "lengths_2d",
        _doc(
            _Q,
            _K,
            _V,
            {"name": "key_lengths", "shape": [1, 2], "datatype": "INT64", "data": [1, 2]},
        ),
        400,
        ("key_lengths", "[B]"),
    ),  # fmt: skip
    (
        "length_too_long",
        _doc(
            _Q, _K, _V, {"name": "key_lengths", "shape": [2], "datatype": "INT64", "data": [3, 99]}
        ),
        400,
        ("key_lengths", "99"),
    ),  # fmt: skip
    ("head_dims", _doc(_Q, json_input("k", _X["k"][..., :4]), _V), 400, ("k", "head dim")),
    ("unknown_output", _doc(_Q, _K, _V, outputs=[{"name": "scores"}]), 400, ("'scores'",)),
    (
        "unknown_parameter",
        _doc(_Q, _K, _V, parameters={"casual": True}),
        400,
        ("'casual'", "causal"),
    ),
    (
        "bad_window",
        _doc(_Q, _K, _V, parameters={"window_left": -1}),
        400,
        ("window_left", "greater than or equal to 0"),
    ),
    ("bad_dilation", _doc(_Q, _K, _V, parameters={"dilation": 0}), 400, ("dilation",)),
    ("bad_causal", _doc(_Q, _K, _V, parameters={"causal": "sideways"}), 400, ("causal",)),
    ("bad_softcap", _doc(_Q, _K, _V, parameters={"softcap": -1}), 400, ("softcap",)),
    (
        "bad_tokens",
        _doc(_Q, _K, _V, parameters={"global_tokens": "1,x"}),
        400,
        ("global_tokens", "integers"),
    ),
    (
        "tokens_outside",
        _doc(_Q, _K, _V, parameters={"global_tokens": 40}),
        400,
        ("global_tokens", "40"),
    ),
    (
        "alibi_count",
        _doc(_Q, _K, _V, parameters={"alibi_slopes": "0.5,0.25"}),
        400,
        ("alibi_slopes", "one per head"),
    ),
    (
        "heatmap_head",
        _doc(_Q, _K, _V, parameters={"heatmap": True, "heatmap_heads": "9"}),
        400,
        ("heatmap_heads", "9"),
    ),
    (
        "heatmap_option_alone",
        _doc(_Q, _K, _V, parameters={"heatmap_heads": "all"}),
        400,
        ("heatmap_heads", "heatmap: true"),
    ),
    (
        "binary_data_output",
        _doc(_Q, _K, _V, parameters={"binary_data_output": "yes"}),
        400,
        ("binary_data_output",),
    ),
    # A sequence's first request starts it (tests/web/v2/test_sequences.py streams them).
    (
        "unknown_sequence",
        _doc(_Q, _K, _V, parameters={"sequence_id": 3}),
        404,
        ("sequence 3", "sequence_start"),
    ),
    (
        "sequence_without_id",
        _doc(_Q, _K, _V, parameters={"sequence_end": True}),
        400,
        ("sequence_id",),
    ),
    (
        "shared_memory",
        _doc(_Q | {"parameters": {"shared_memory_region": "r"}}, _K, _V),
        400,
        ("'q'", "shared memory"),
    ),
    (
        "unsupported_by_method",
        _doc(_Q, _K, _V, parameters={"method": "linear", "softcap": 2.0}),
        400,
        ("softcap", "linear"),
    ),
    (
        "heatmap_with_compare",
        _doc(_Q, _K, _V, parameters={"method": "linear", "compare": True, "heatmap": True}),
        400,
        ("heatmap", "/v1/attention"),
    ),
    (
        "declared_too_large",
        _doc(_Q | {"shape": [1, 1, 1000, 1000]}, _K, _V),
        413,
        ("q", "ATTN_MAX_ELEMENTS"),
    ),
]


@pytest.mark.parametrize(
    ("name", "doc", "status", "fragments"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests(http, name, doc, status, fragments) -> None:
    assert_error(raw_infer(http, doc), status, *fragments)


def test_nan_in_binary_input_names_the_input(tc) -> None:
    x = qkv(22)
    x["k"][0, 0, 0, 0] = np.nan
    with pytest.raises(InferenceServerException) as info:
        v2_infer(tc, "attention", x)
    assert info.value.status() == "400"
    assert info.value.message().startswith("k:") and "NaN" in info.value.message()


def test_bool_bytes_other_than_0_and_1(http) -> None:
    x = qkv(23)
    mask = bytes([0, 1, 2, 1])
    header = {
        "inputs": [json_input(n, a) for n, a in x.items()]
        + [{"name": "mask", "shape": [4], "datatype": "BOOL",
            "parameters": {"binary_data_size": 4}}]
    }  # fmt: skip
    assert_error(raw_infer(http, header, mask), 400, "'mask'", "0 or 1")


def test_outputs_over_the_element_limit_are_refused_before_computing(tc) -> None:
    rng = np.random.default_rng(24)
    x = {n: rng.standard_normal((1, 1, 500, 4)).astype(np.float32) for n in ("q", "k", "v")}
    assert v2_infer(tc, "attention", x)["output"].shape == (1, 1, 500, 4)
    with pytest.raises(InferenceServerException) as info:
        v2_infer(tc, "attention", x, outputs=("output", "weights"))
    assert info.value.status() == "413" and "ATTN_MAX_ELEMENTS" in info.value.message()


def test_multihead_errors(http) -> None:
    query = json_input("query", np.ones((1, 3, 8), np.float32))
    proj = json_input("q_proj", np.eye(8, dtype=np.float32))
    assert_error(raw_infer(http, _doc(query), model="multihead"), 400, "num_heads", "required")
    doc = _doc(query, proj, parameters={"num_heads": 2})
    assert_error(raw_infer(http, doc, model="multihead"), 400, "k_proj, v_proj, out_proj")
    doc = _doc(query, parameters={"num_heads": 3})
    assert_error(raw_infer(http, doc, model="multihead"), 400, "num_heads", "divisible")
    doc = _doc(query, parameters={"num_heads": 2, "return_weights": True})
    assert_error(raw_infer(http, doc, model="multihead"), 400, "'return_weights'", "need_weights")


# ---------------------------------------------------------------------------------------------
# Limits and the shared scheduler, in process (they need their own settings)


def _small_request() -> dict[str, Any]:
    return _doc(*(json_input(n, np.eye(2, dtype=np.float32)) for n in ("q", "k", "v")))


def test_body_over_the_limit_is_413(tmp_path: Path) -> None:
    with app_client(tmp_path, max_body_bytes=2000) as c:
        zeros = np.zeros((30, 30), np.float32)
        big = orjson.dumps(_doc(*(json_input(n, zeros) for n in ("q", "k", "v"))))
        r = c.post("/v2/models/attention/infer", content=big)
        assert r.status_code == 413 and set(r.json()) == {"error"}
        assert "ATTN_MAX_BODY_BYTES" in r.json()["error"]
        # A small compressed body that inflates past the limit.
        bomb = gzip.compress(big)
        assert len(bomb) < 2000
        r = c.post("/v2/models/attention/infer", content=bomb, headers={"content-encoding": "gzip"})
        assert r.status_code == 413 and "decompressed" in r.json()["error"]
        r = c.post("/v2/models/attention/infer", content=orjson.dumps(_small_request()))
        assert r.status_code == 200, r.text


def test_overloaded_is_503_with_retry_after(tmp_path: Path) -> None:
    """With the one worker busy and no queue, /v2 is refused at once, like /v1."""
    with app_client(tmp_path, max_concurrency=1, queue_size=0, retry_after_s=7) as c:
        scheduler = c.app.state.services.scheduler
        release = threading.Event()
        held = c.portal.start_task_soon(scheduler.run, "hold", release.wait)
        try:
            deadline = time.monotonic() + 30
            while scheduler.running == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert scheduler.running == 1
            r = c.post("/v2/models/attention/infer", content=orjson.dumps(_small_request()))
            assert r.status_code == 503 and r.headers["retry-after"] == "7"
            assert set(r.json()) == {"error"} and "ATTN_MAX_CONCURRENCY" in r.json()["error"]
        finally:
            release.set()
            held.result(timeout=30)
        r = c.post("/v2/models/attention/infer", content=orjson.dumps(_small_request()))
        assert r.status_code == 200, r.text


def test_a_bug_is_a_logged_500_in_the_protocol_form(tmp_path: Path, monkeypatch, caplog) -> None:
    def boom(*args: Any) -> Any:
        raise RuntimeError("internal detail")

    model = models.MODELS["attention"]
    monkeypatch.setitem(models.MODELS, "attention", dataclasses.replace(model, run=boom))
    # The 500 is answered by Starlette's ServerErrorMiddleware, which then re-raises for the
    # server's log; the test client reports the answer instead of raising.
    with app_client(tmp_path, raise_server_exceptions=False) as c:
        r = c.post("/v2/models/attention/infer", content=orjson.dumps(_small_request()))
    assert r.status_code == 500 and set(r.json()) == {"error"}
    assert "internal detail" not in r.json()["error"]  # internals stay in the log
    assert any("unhandled error" in rec.getMessage() for rec in caplog.records)
