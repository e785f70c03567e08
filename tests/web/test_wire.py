"""service.web.wire's bulk reading of nested float lists: the same values as the general JSON path,
and every body it must not read in bulk still answered by the general path (same errors)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.web import wire
from service.web.v1.schemas import AttentionRequest
from tests.support.http import app_client, assert_problem, decode

TENSORS = wire.tensor_fields(AttentionRequest)


def _post(c: Any, text: bytes) -> Any:
    return c.post("/v1/attention", content=text, headers={"content-type": "application/json"})


def test_tensor_fields_of_the_attention_request() -> None:
    assert {"q", "k", "v", "mask"} == TENSORS


@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 3, 4), (2, 1, 3, 2)])
def test_bulk_floats_equal_the_general_parse(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    values = rng.standard_normal(shape) * 10.0 ** rng.integers(-300, 300, shape)
    flat = values.ravel()
    flat[1] = -0.0
    flat[-1] = 5e-324  # the smallest subnormal
    body = orjson.dumps({"q": values.tolist(), "causal": True, "heatmap": {"tokens": ["a"]}})
    fast = wire.parse_json(body, TENSORS)
    general = orjson.loads(body)
    assert isinstance(fast["q"], np.ndarray) and fast["q"].dtype == np.float64
    expected = np.array(general["q"], dtype=np.float64)
    assert fast["q"].shape == expected.shape
    assert np.array_equal(fast["q"], expected)
    assert np.array_equal(np.signbit(fast["q"]), np.signbit(expected))
    assert {k: v for k, v in fast.items() if k != "q"} == {
        k: v for k, v in general.items() if k != "q"
    }


@pytest.mark.parametrize(
    "body", [b"{}", b'{"causal": true, "window": {"left": 3}}', b'{"q": {"dtype": "float32"}}']
)
def test_bodies_without_list_tensors_parse_as_before(body: bytes) -> None:
    assert wire.parse_json(body, TENSORS) == orjson.loads(body)


def test_an_empty_object_is_named_missing_fields(client) -> None:
    body = assert_problem(_post(client, b"{}"), 422)
    assert {"q", "k", "v"} <= {e["loc"][0] for e in body["errors"]}


def test_integers_after_a_float_are_floats_as_in_the_general_path() -> None:
    body = b'{"q": [[0.5, 2], [3, -4]]}'
    assert np.array_equal(wire.parse_json(body, TENSORS)["q"], [[0.5, 2.0], [3.0, -4.0]])


@pytest.mark.parametrize(
    "body",
    [
        b'{"q": [[1, 2.5]]}',  # ints first: the general path keeps integer data
        b'{"q": [[1.5, 2.0], [3.0, 4.0, 5.0], [6.0]]}',  # ragged, same count as 3 x 2
        b'{"q": [[1.5, 2.0], [3.0]]}',
        b'{"q": [[1.5, [], [2.0, 3.0]], [4.0, 5.0, 6.0]]}',  # arrays as leaves, same count
        b'{"q": [[1.5, [], [2.0, 3.0]], [4.0, 5.0, 6.0]], "x": "\\u005b"}',
        b'{"q": [[1.5, [2.0]], [3.0, 4.0]], "encoding": "["}',
        b'{"q": [[1.5, 2.0], 3.0]}',
        b'{"q": [[1.5, true]]}',
        b'{"q": [[1.5, null]]}',
        b'{"q": [[1.5, "2"]]}',
        b'{"q": [[1.5, {"a": 1}]]}',
        b'{"q": []}',
        b'{"q": [[[[[[[[[1.5]]]]]]]]]}',  # more dimensions than a tensor may have
        b'{"q": [[1.5]], "q": [[2.5]]}',  # duplicate keys: the last counts
        b'{"q": [[1.5]], "[": 1}',
        b"[[1.5]]",
    ],
)
def test_bodies_not_read_in_bulk_parse_as_before(body: bytes) -> None:
    assert wire.parse_json(body, TENSORS) == orjson.loads(body)


@pytest.mark.parametrize(
    "text",
    [
        b'{"q": [[1.5, 2.0], [3.0, 4.0, 5.0], [6.0]], "k": [[1.0, 1.0]], "v": [[1.0, 1.0]]}',
        b'{"q": [[1.5, [], [2.0, 3.0]], [4.0, 5.0, 6.0]], "k": [[1.0, 1.0, 1.0]],'
        b' "v": [[1.0, 1.0]]}',
        b'{"q": [[1.5, [2.0]], [3.0, 4.0]], "k": [[1.0, 1.0]], "v": [[1.0, 1.0]]}',
        b'{"q": [[1.5, 2.0]], "k": [[1.0, 1.0]], "v": [[1.0, "x"]]}',
    ],
)
def test_malformed_nested_lists_are_named(client, text: bytes) -> None:
    body = assert_problem(_post(client, text), 422)
    assert body["errors"][0]["loc"][0] in {"q", "v"}


def test_duplicate_keys_keep_the_last_value(client) -> None:
    # The first q attends to the first key, the last q to the second.
    text = (
        b'{"q": [[90.0, 0.0]], "q": [[0.0, 90.0]], "k": [[1.0, 0.0], [0.0, 1.0]],'
        b' "v": [[2.0, 3.0], [4.0, 5.0]]}'
    )
    r = _post(client, text)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(decode(r.json()["output"]), [[4.0, 5.0]], atol=1e-6)


def test_bulk_read_request_answers_like_a_float32_numpy_request(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 16, 8)).astype(np.float32) for _ in range(3))
    with app_client(tmp_path) as c:
        as_lists = _post(c, orjson.dumps({"q": q.tolist(), "k": k.tolist(), "v": v.tolist()}))
    assert as_lists.status_code == 200, as_lists.text
    # Independent reference: float64 softmax attention of the same values.
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    s = q64 @ k64.transpose(0, 2, 1) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v64
    np.testing.assert_allclose(decode(as_lists.json()["output"]), expected, atol=2e-6)


# Any JSON a client might send in place of a tensor: the bulk path gives what numpy makes of the
# general parse (np.array(..., float64)), or leaves the body to the general path unchanged.
_leaf = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(-(2**70), 2**70),
    st.booleans(),
    st.none(),
    st.text(alphabet="[]ab", max_size=3),
)
_value = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=4), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(
    q=_value,
    k=_value,
    other=st.dictionaries(st.text(alphabet="[ab", max_size=2), _value, max_size=2),
)
def test_bulk_path_agrees_with_the_general_parse(q: Any, k: Any, other: dict[str, Any]) -> None:
    _agrees({**other, "q": q, "k": k})


def _agrees(request: dict[str, Any]) -> None:
    body = json.dumps(request).encode()
    general = wire.parse_json(body)  # the general path: orjson, json for what orjson refuses
    got = wire.parse_json(body, TENSORS)
    assert set(got) == set(general)
    for key, value in got.items():
        if isinstance(value, np.ndarray):
            expected = np.array(general[key], dtype=np.float64)
            assert value.shape == expected.shape and np.array_equal(value, expected)
        else:
            assert value == general[key]


@st.composite
def _nearly_rectangular(draw: st.DrawFn) -> Any:
    """A rectangular float list, sometimes with one defect a client could send."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    flat = draw(
        st.lists(
            st.floats(allow_nan=False, allow_infinity=False, width=32),
            min_size=math.prod(shape),
            max_size=math.prod(shape),
        )
    )
    value = np.array(flat, dtype=np.float64).reshape(shape).tolist()
    if len(shape) == 1 or draw(st.booleans()):
        return value
    row = value
    for _ in range(draw(st.integers(0, len(shape) - 2))):
        row = row[draw(st.integers(0, len(row) - 1))]
    i = draw(st.integers(0, len(row) - 1))
    defect = draw(st.sampled_from(["leaf", "drop", "append", "list"]))
    if defect == "leaf":
        defects = (st.none(), st.booleans(), st.just("1"), st.just([]), st.just([1.5]))
        row[i] = draw(st.one_of(*defects))
    elif defect == "drop":
        del row[i]
    elif defect == "append":
        row.append(row[i])
    else:
        row[i] = [row[i]]
    return value


@settings(max_examples=400, deadline=None)
@given(q=_nearly_rectangular(), k=_nearly_rectangular())
def test_bulk_path_agrees_on_nearly_rectangular_lists(q: Any, k: Any) -> None:
    _agrees({"q": q, "k": k})
