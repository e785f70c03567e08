"""POST /v1/attention in process: every tensor encoding, every option, every input error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import service
from tests.support.http import (
    app_client,
    assert_problem,
    b64,
    bfloat16_round,
    data,
    decode,
    post,
)
from tests.support.reference import reference_attention

# Settings of this module's `client` fixture (tests/conftest.py).
APP_SETTINGS = {"max_elements": 200_000}


def qkv(seed: int, shape_q=(2, 4, 8, 16), shape_kv=(2, 2, 12, 16)) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal(shape_q).astype(np.float32)
    k = rng.standard_normal(shape_kv).astype(np.float32)
    v = rng.standard_normal(shape_kv).astype(np.float32)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Encodings: the service decodes each form to the values a numpy user would pass, and answers
# exactly what the Python API answers for those values.


def bfloat16_values(a: np.ndarray) -> np.ndarray:
    """bfloat16 tensors decode to bfloat16 values (ml_dtypes), which the kernel reads as such."""
    return bfloat16_round(a).astype(ml_dtypes.bfloat16)


ENCODINGS = [
    ("list", lambda a: a.tolist(), lambda a: a.astype(np.float64)),
    ("data-float32", lambda a: data(a, "float32"), lambda a: a),
    ("data-float64", lambda a: data(a.astype(np.float64)), lambda a: a.astype(np.float64)),
    ("data-float16", lambda a: data(a.astype(np.float16)), lambda a: a.astype(np.float16)),
    ("data-bfloat16", lambda a: data(bfloat16_round(a), "bfloat16"), bfloat16_values),
    ("b64-float32", lambda a: b64(a), lambda a: a),
    ("b64-float64", lambda a: b64(a.astype(np.float64)), lambda a: a.astype(np.float64)),
    ("b64-float16", lambda a: b64(a.astype(np.float16)), lambda a: a.astype(np.float16)),
    ("b64-bfloat16", lambda a: b64(a, "bfloat16"), bfloat16_values),
]


@pytest.mark.parametrize(("name", "encode", "as_numpy"), ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_every_encoding_matches_the_python_api_exactly(client, name, encode, as_numpy) -> None:
    q, k, v = qkv(1)
    r = post(client, "/v1/attention", {"q": encode(q), "k": encode(k), "v": encode(v)})
    assert r.status_code == 200, r.text
    expected = service.attention(as_numpy(q), as_numpy(k), as_numpy(v)).output
    out = r.json()["output"]
    if name.startswith("b64"):
        assert out["dtype"] == "float32" and out["shape"] == list(expected.shape)
        got = decode(out)
    else:
        # Lists answer lists; float32 values survive the decimal round trip exactly.
        assert isinstance(out, list)
        got = decode(out).astype(np.float32)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_out_dtype_input_answers_16_bit_tensors_in_kind(client, dtype: str) -> None:
    q, k, v = qkv(5)
    body = {
        n: b64(x.astype(np.float16) if dtype == "float16" else x, dtype)
        for n, x in zip("qkv", (q, k, v), strict=True)
    }
    r = post(client, "/v1/attention", {**body, "out_dtype": "input"})
    assert r.status_code == 200, r.text
    out = r.json()["output"]
    assert out["dtype"] == dtype and out["shape"] == list(q.shape)
    as_numpy = bfloat16_values if dtype == "bfloat16" else (lambda a: a.astype(np.float16))
    expected = service.attention(as_numpy(q), as_numpy(k), as_numpy(v), out_dtype="input").output
    got = decode(out)
    if dtype == "bfloat16":  # the b64 carries bfloat16's bits
        got = got.view(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_out_dtype_input_in_list_encoding_answers_the_16_bit_values(client, dtype: str) -> None:
    """JSON numbers of the 16-bit results (orjson writes no bfloat16 array as it is)."""
    q, k, v = qkv(6)
    body = {n: {"dtype": dtype, "shape": list(x.shape), "data": x.ravel().tolist()} for n, x in
            zip("qkv", (q, k, v), strict=True)}  # fmt: skip
    r = post(client, "/v1/attention", {**body, "out_dtype": "input", "encoding": "list"})
    assert r.status_code == 200, r.text
    # Numbers are rounded to the dtype, nearest even, as numpy (ml_dtypes) rounds them.
    wire_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    q, k, v = (x.astype(wire_dtype) for x in (q, k, v))
    expected = service.attention(q, k, v, out_dtype="input").output
    # Each number is the shortest decimal that reads back as the 16-bit value.
    np.testing.assert_array_equal(np.array(r.json()["output"]).astype(wire_dtype), expected)


def test_output_matches_an_independent_float64_reference(client) -> None:
    q, k, v = qkv(2)
    r = post(client, "/v1/attention", {"q": b64(q), "k": b64(k), "v": b64(v), "causal": True})
    ref = reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(decode(r.json()["output"]), ref.output.numpy(), atol=2e-5)


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_ranks_and_meta(client, rank: int) -> None:
    q, k, v = qkv(3, (1, 2, 5, 8), (1, 2, 7, 8))
    if rank == 2:
        q, k, v = q[0, 0], k[0, 0], v[0, 0]
    elif rank == 3:
        q, k, v = q[0], k[0], v[0]
    r = post(client, "/v1/attention", {"q": q, "k": k, "v": v})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = service.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert body["meta"]["shape"] == list(expected.output.shape) == list(q.shape)
    assert body["meta"]["flops"] == expected.flops
    assert body["meta"]["method"] == "exact"
    assert body["meta"]["elapsed_ms"] >= 0
    assert body["heatmaps"] == []
    assert "weights" not in body and "lse" not in body


def test_response_encoding_follows_q_unless_asked(client) -> None:
    q, k, v = qkv(4, (6, 8), (6, 8))
    as_list = post(client, "/v1/attention", {"q": q.tolist(), "k": b64(k), "v": b64(v)}).json()
    assert isinstance(as_list["output"], list)
    as_b64 = post(client, "/v1/attention", {"q": b64(q), "k": k.tolist(), "v": v.tolist()}).json()
    assert set(as_b64["output"]) == {"dtype", "shape", "b64"}
    forced = post(
        client,
        "/v1/attention",
        {"q": q.tolist(), "k": k, "v": v, "encoding": "b64", "return_weights": True},
    ).json()
    assert set(forced["output"]) == {"dtype", "shape", "b64"}
    assert set(forced["weights"]) == {"dtype", "shape", "b64"}
    back = post(
        client, "/v1/attention", {"q": b64(q), "k": b64(k), "v": b64(v), "encoding": "list"}
    )
    assert isinstance(back.json()["output"], list)
    np.testing.assert_array_equal(
        decode(forced["output"]), decode(back.json()["output"]).astype(np.float32)
    )


def test_every_option_passes_through_unchanged(client) -> None:
    q, k, v = qkv(5, (2, 4, 8, 16), (2, 2, 10, 16))
    rng = np.random.default_rng(5)
    mask = rng.random((2, 1, 8, 10)) > 0.2
    options = {
        "scale": 0.3,
        "causal": "bottom_right",
        "mask": mask.tolist(),
        "key_lengths": [10, 7],
        "window": {"left": 4, "right": 1, "dilation": 1},
        "global_tokens": [0],
        "alibi_slopes": True,
        "softcap": 5.0,
        "return_weights": True,
    }
    r = post(client, "/v1/attention", {"q": b64(q), "k": b64(k), "v": b64(v), **options})
    assert r.status_code == 200, r.text
    body = r.json()
    api_options = {**options, "mask": mask}
    expected = service.attention(q, k, v, **api_options)
    np.testing.assert_array_equal(decode(body["output"]), expected.output)
    np.testing.assert_array_equal(decode(body["weights"]), expected.weights)
    np.testing.assert_array_equal(decode(body["lse"]), expected.lse)
    ref_options = {key: val for key, val in api_options.items() if key != "return_weights"}
    ref = reference_attention(q, k, v, **ref_options)
    np.testing.assert_allclose(decode(body["weights"]), ref.weights.numpy(), atol=1e-5)


def test_bool_mask_in_every_form(client) -> None:
    q, k, v = qkv(6, (1, 1, 4, 8), (1, 1, 5, 8))
    mask = np.array([[1, 1, 0, 0, 1]] * 4, dtype=bool)
    expected = service.attention(q, k, v, mask=mask).output
    for form in (mask.tolist(), data(mask), b64(mask), mask.astype(int).tolist()):
        r = post(client, "/v1/attention", {"q": b64(q), "k": b64(k), "v": b64(v), "mask": form})
        if (
            isinstance(form, list)
            and isinstance(form[0][0], int)
            and not isinstance(form[0][0], bool)
        ):
            # Integer masks are ambiguous (attend or ignore?): the API refuses them by name.
            assert_problem(r, 422, ["mask"])
            continue
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(decode(r.json()["output"]), expected)


def test_empty_rows_give_null_in_lists_and_inf_in_b64(client) -> None:
    q, k, v = qkv(7, (2, 1, 3, 4), (2, 1, 3, 4))
    body = {"q": q, "k": k, "v": v, "key_lengths": [0, 3], "return_weights": True}
    lists = post(client, "/v1/attention", body).json()
    assert lists["lse"][0][0] == [None, None, None]  # JSON has no -inf
    assert all(x is not None for x in lists["lse"][1][0])
    packed = post(client, "/v1/attention", {**body, "encoding": "b64"}).json()
    assert np.isneginf(decode(packed["lse"])[0]).all()


# ---------------------------------------------------------------------------------------------
# Input errors: 422 naming the field (413 for sizes), never a 500.


def _ok() -> dict[str, Any]:
    q, k, v = qkv(8, (3, 4), (3, 4))
    return {"q": q.tolist(), "k": k.tolist(), "v": v.tolist()}


@pytest.mark.parametrize(
    ("change", "loc", "words"),
    [
        ({"k": [[1.0, 2.0, 3.0]] * 3}, ["k"], "head dim"),
        ({"q": [[1.0, 2.0], [3.0]]}, ["q"], "ragged"),
        ({"q": [["a", "b"]]}, ["q"], "numbers"),
        ({"q": {"dtype": "float32", "shape": [2, 2], "b64": "not base64!"}}, ["q"], "base64"),
        ({"q": {"dtype": "float32", "shape": [2, 2], "b64": "AAAA"}}, ["q"], "bytes"),
        ({"k": {"dtype": "float32", "shape": [3, 4], "data": [1.0] * 11}}, ["k"], "11 values"),
        ({"v": {"dtype": "int8", "shape": [3, 4], "data": [1] * 12}}, ["v"], "unknown dtype"),
        ({"v": {"dtype": "int32", "shape": [3, 4], "data": [1e10] * 12}}, ["v"], "range"),
        ({"v": {"dtype": "int32", "shape": [3, 4], "data": [0.5] * 12}}, ["v"], "whole"),
        ({"q": {"dtype": "bool", "shape": [3, 4], "data": [2] * 12}}, ["q"], "true/false"),
        ({"q": {"dtype": "float32", "shape": [-3, 4], "data": []}}, ["q"], "negative"),
        ({"q": {"dtype": "float32", "shape": [1] * 9, "data": [1.0]}}, ["q"], "dimensions"),
        ({"q": {"dtype": "float32", "shape": "3x4", "data": []}}, ["q"], "shape"),
        ({"q": {"shape": [2], "data": [1.0, 2.0], "extra": 1}}, ["q"], "unknown tensor keys"),
        ({"q": 5.0}, ["q"], "dimensions"),
        ({"q": True}, ["q"], "dtype"),
        ({"q": None}, ["q"], ""),
        ({"window": {"left": -1}}, ["window", "left"], "greater than or equal"),
        ({"causal": "maybe"}, ["causal"], "top_left"),
        ({"key_lengths": [9]}, ["key_lengths", 0], "exceeds"),
        ({"key_lengths": [1, 2]}, ["key_lengths"], "one per batch"),
        ({"global_tokens": [7]}, ["global_tokens"], "outside"),
        ({"alibi_slopes": [1.0, 2.0]}, ["alibi_slopes"], "one per head"),
        ({"softcap": -1.0}, ["softcap"], "greater than"),
        ({"mask": [[1.0, 2.0]]}, ["mask"], "broadcastable"),
        ({"heatmap": "yes"}, ["heatmap"], "true, false or an object"),
        ({"heatmap": {"heads": "some"}}, ["heatmap", "heads"], ""),
        ({"encoding": "xml"}, ["encoding"], "list"),
        ({"bogus": 1}, ["bogus"], "xtra"),
        ({"return_weights": "sometimes"}, ["return_weights"], "boolean"),
    ],
)
def test_invalid_input_names_the_field(client, change, loc, words) -> None:
    r = post(client, "/v1/attention", {**_ok(), **change})
    body = assert_problem(r, 422, loc)
    assert words.lower() in body["detail"].lower(), body


def test_missing_tensor_is_named(client) -> None:
    body = _ok()
    del body["v"]
    assert_problem(post(client, "/v1/attention", body), 422, ["v"])


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (b'{"q": [[NaN, 1.0]], "k": [[1.0, 1.0]], "v": [[1.0, 1.0]]}', "q"),
        (b'{"q": [[1.0, 1.0]], "k": [[Infinity, 1.0]], "v": [[1.0, 1.0]]}', "k"),
        (b'{"q": [[1.0, 1.0]], "k": [[1.0, 1.0]], "v": [[-Infinity, 1.0]]}', "v"),
        (b'{"q": [[1e400, 1.0]], "k": [[1.0, 1.0]], "v": [[1.0, 1.0]]}', "q"),
    ],
)
def test_nan_and_inf_in_json_are_named(client, text: bytes, field: str) -> None:
    r = client.post("/v1/attention", content=text, headers={"content-type": "application/json"})
    body = assert_problem(r, 422, [field])
    assert "nan or inf" in body["detail"].lower()


def test_nan_in_b64_is_named(client) -> None:
    q, k, v = qkv(9, (3, 4), (3, 4))
    v[1, 2] = np.nan
    r = post(client, "/v1/attention", {"q": b64(q), "k": b64(k), "v": b64(v)})
    assert_problem(r, 422, ["v"])


def test_absurd_shapes_are_refused_before_allocation(client) -> None:
    huge = {"dtype": "float32", "shape": [1 << 30, 1 << 30], "b64": ""}
    body = assert_problem(post(client, "/v1/attention", {**_ok(), "q": huge}), 413, ["q"])
    assert "200000" in body["detail"]  # the limit is named


def test_tensor_over_the_element_limit_is_413(client) -> None:
    big = np.zeros((1, 200_001), dtype=np.float32)
    assert_problem(post(client, "/v1/attention", {**_ok(), "k": b64(big)}), 413, ["k"])


def test_outputs_over_the_limit_are_refused_before_computing(client) -> None:
    # Inputs within the limit whose output (Lq x Dv) or weights (Lq x Lk) would not be.
    q = np.ones((1000, 1), np.float32)
    v = np.ones((1, 1000), np.float32)
    body = assert_problem(
        post(client, "/v1/attention", {"q": b64(q), "k": b64(q[:1]), "v": b64(v)}), 413
    )
    assert body["errors"][0]["loc"] == ["v"] and "output" in body["detail"]
    kk = np.ones((1000, 1), np.float32)
    r = post(
        client, "/v1/attention", {"q": b64(q), "k": b64(kk), "v": b64(kk), "return_weights": True}
    )
    assert_problem(r, 413, ["k"])


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b'{"q": [1, 2', b"[1, 2, 3]", b'"text"', b"\xff\xfe", b"[" * 5000 + b"]" * 5000],
)
def test_malformed_bodies_are_400(client, content: bytes) -> None:
    r = client.post("/v1/attention", content=content, headers={"content-type": "application/json"})
    assert_problem(r, 400)


def test_deeply_nested_lists_are_refused(client) -> None:
    deep: Any = [1.0]
    for _ in range(200):
        deep = [deep]
    r = post(client, "/v1/attention", {**_ok(), "q": deep})
    assert r.status_code == 422, r.text


def test_empty_dimensions(client) -> None:
    q = np.zeros((0, 4), np.float32)
    k = np.ones((3, 4), np.float32)
    r = post(client, "/v1/attention", {"q": b64(q), "k": b64(k), "v": b64(k)})
    assert r.status_code == 200, r.text
    assert decode(r.json()["output"]).shape == (0, 4)
    zero_d = np.zeros((3, 0), np.float32)
    r = post(client, "/v1/attention", {"q": b64(zero_d), "k": b64(zero_d), "v": b64(k)})
    assert_problem(r, 422, ["q"])


def test_heatmap_beyond_the_max_side_is_pooled_or_a_clear_422(tmp_path: Path) -> None:
    q = np.ones((20, 4), np.float32)
    with app_client(tmp_path, heatmap_max_side=16) as small:
        # /v1/attention pools long exact maps (test_attention_maps.py checks the picture).
        r = post(small, "/v1/attention", {"q": b64(q), "k": b64(q), "v": b64(q), "heatmap": True})
        assert r.status_code == 200, r.text
        assert len(r.json()["heatmaps"]) == 1
        # /v1/multihead still refuses them, naming the limit.
        body = {"query": b64(q[None]), "num_heads": 1, "heatmap": True}
        r = post(small, "/v1/multihead", body)
        body = assert_problem(r, 422, ["heatmap"])
        assert "ATTN_HEATMAP_MAX_SIDE" in body["detail"] and "16" in body["detail"]
