"""Property-based fuzzing of every endpoint from the app's own OpenAPI schema (schemathesis).

In-process (ASGI, lifespan run), positive and negative examples: no answer may be a 5xx, and
every answer must conform to the schema (status code documented, content type, body schema).
ATTN_FUZZ_SCALE multiplies the fuzzed examples per operation (`make fuzz` runs 10x); the
default keeps the whole module around a minute.

The schema's generator rarely reaches the approximations' parameters or the shapes that hold
nothing, so a second fuzzer aims at them on both fronts (/v1 JSON tensors in every form, /v2 JSON
and binary): every method with num_features, linformer_k, seed (in range and out), empty and
huge-but-empty shapes, values up to float32's limit; each answer a documented 4xx in its front's
form, or the output of the right shape, all finite.
"""

from __future__ import annotations

import atexit
import base64
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.python.asgi import ASGIClient, get_client
from schemathesis.specs.openapi import checks as openapi_checks

from service.core.approx import SUPPORTED
from service.web.app import create_app
from tests.support.http import app_client, app_settings, decode

# Fuzzed examples per operation, after the schema's examples and the coverage phase's cases.
EXAMPLES = 15 * int(os.environ.get("ATTN_FUZZ_SCALE", "1"))

CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]


def _app(tmp: Path) -> FastAPI:
    # Small limits: generated tensors stay cheap, and the 413 paths get exercised too.
    return create_app(app_settings(tmp, max_elements=4096, max_weight_elements=1 << 16))


# Loaded at import: schemathesis.pytest.from_fixture breaks on pytest 9 (node._nodeid).
_TMP = Path(tempfile.mkdtemp(prefix="fuzz-schema-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(_TMP))


@pytest.fixture
def asgi_client(tmp_path: Path) -> Iterator[ASGIClient]:
    """One in-process client on a fresh app per operation.

    Fresh: schemathesis ends the app's lifespan after each test, and a lifespan is not
    restartable (it closes the scheduler). One client: not one per request (faster).
    """
    with get_client(_app(tmp_path)) as c:
        yield c


def fuzz_settings(examples: int) -> Any:
    """Hypothesis settings of both fuzzers: no deadline (a loaded machine), reproducible in
    `make test`; `make fuzz` (ATTN_FUZZ_RANDOM=1) explores new examples."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=not os.environ.get("ATTN_FUZZ_RANDOM"),
        database=None,
    )


@schema.parametrize()
@fuzz_settings(EXAMPLES)
def test_every_endpoint(case: schemathesis.Case, asgi_client: ASGIClient) -> None:
    case.call_and_validate(session=asgi_client, checks=CHECKS)


# ---------------------------------------------------------------------------------------------
# The approximations' parameters and empty, huge-but-empty shapes, on both fronts

APPROX_EXAMPLES = 150 * int(os.environ.get("ATTN_FUZZ_SCALE", "1"))
HUGE = [2**31, 2**40, 10**12]  # past the kernels' 2^31 and the element limit
ANSWERS = {200, 400, 413, 415, 422}  # documented for both routes (no overload in-process)


@dataclass
class Call:
    """One generated request: its front, body and headers, and the output shape it asks for."""

    front: str
    body: bytes
    headers: dict[str, str]
    output: tuple[int, ...]


def _dims(draw: st.DrawFn, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], int, int]:
    """Leading dims of q and of k/v, Lq, Lk."""
    b, hkv = draw(st.integers(0, 2)), draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(0, 2))
    lead_q, lead_kv = (b, hq)[4 - rank :], (b, hkv)[4 - rank :]
    return lead_q, lead_kv, draw(st.integers(0, 7)), draw(st.integers(0, 7))


@st.composite
def approx_calls(draw: st.DrawFn) -> Call:
    rank = draw(st.sampled_from([2, 3, 4]))
    lead_q, lead_kv, lq, lk = _dims(draw, rank)
    d, dv = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    shapes = {"q": [*lead_q, lq, d], "k": [*lead_kv, lk, d], "v": [*lead_kv, lk, dv]}
    if draw(st.integers(0, 4)) == 0:  # huge but empty (or, with no zero left, just huge)
        name = draw(st.sampled_from("qkv"))
        axes = len(shapes[name]) - 1
        shapes[name][draw(st.integers(0, axes - 1))] = 0
        shapes[name][draw(st.integers(0, axes - 1))] = draw(st.sampled_from(HUGE))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = draw(st.sampled_from([1.0, 1.0, 1.0, 1e19, 3e38]))
    arrays = {
        n: np.clip(rng.standard_normal(s) * (magnitude if n == "v" else 1), -3e38, 3e38).astype(
            np.float32
        )
        if math.prod(s) <= 4096
        else None
        for n, s in shapes.items()
    }
    method = draw(st.sampled_from(METHODS))
    options: dict[str, Any] = {"method": method}
    for name, (valid, _) in PARAMETERS.items():
        if (name in SUPPORTED[method] or name == "heatmap") and draw(st.integers(0, 2)) == 0:
            options[name] = draw(st.sampled_from(valid))
    if draw(st.integers(0, 5)) == 0:  # one out of range, or one the method does not take
        name = draw(st.sampled_from(sorted(PARAMETERS)))
        valid, invalid = PARAMETERS[name]
        options[name] = draw(st.sampled_from(invalid or valid))
    if draw(st.booleans()):
        batch = lead_q[0] if rank == 4 else 1
        options["key_lengths"] = [draw(st.integers(0, lk)) for _ in range(batch)]
    output = tuple(shapes["q"][:-1] + shapes["v"][-1:])
    if draw(st.booleans()):
        return _v1(draw, shapes, arrays, options, output)
    return _v2(draw, shapes, arrays, options, output)


METHODS = ["exact", "linear", "performer", "linformer"]
# Each parameter's (valid values, invalid ones); valid ones are sent to the methods taking them.
PARAMETERS: dict[str, tuple[list[Any], list[Any]]] = {
    "num_features": ([1, 3, 64, 16384], [0, -1, 16385, 2**40]),
    "linformer_k": ([1, 2, 16, 16384], [0, 16385]),
    "seed": ([0, 7, 2**40], [-1]),
    "causal": ([True, "bottom_right"], ["diagonal"]),
    "compare": ([True], []),
    "return_weights": ([True], []),
    "softcap": ([0.5], [1e-40, 1e-46]),
    "heatmap": ([True, {"heads": "mean"}], [{"heads": [9]}]),
}


def _v1_tensor(draw: st.DrawFn, shape: list[int], arr: np.ndarray | None) -> Any:
    form = draw(st.sampled_from(["list", "data", "b64"]))
    if arr is None or (form == "list" and 0 in shape[:-1]):  # nested lists cannot say it
        form = "data" if arr is None else "b64"
    if arr is None:
        return {"dtype": "float32", "shape": shape, "data": []}
    if form == "list":
        return arr.tolist()
    if form == "data":
        return {"dtype": "float32", "shape": shape, "data": arr.ravel().tolist()}
    return {"dtype": "float32", "shape": shape, "b64": base64.b64encode(arr.tobytes()).decode()}


def _v1(draw: st.DrawFn, shapes: dict, arrays: dict, options: dict, output: tuple) -> Call:
    body = {n: _v1_tensor(draw, shapes[n], arrays[n]) for n in "qkv"} | options
    return Call("v1", orjson.dumps(body), {"content-type": "application/json"}, output)


def _v2(draw: st.DrawFn, shapes: dict, arrays: dict, options: dict, output: tuple) -> Call:
    params = {k: v for k, v in options.items() if k not in ("key_lengths", "heatmap")}
    if "heatmap" in options:
        params["heatmap"] = True
    inputs: list[dict[str, Any]] = []
    raw = b""
    binary = draw(st.booleans())
    for n in "qkv":
        tensor = {"name": n, "shape": shapes[n], "datatype": "FP32"}
        arr = arrays[n] if arrays[n] is not None else np.zeros(0, np.float32)
        if binary:
            tensor["parameters"] = {"binary_data_size": arr.nbytes}
            raw += arr.tobytes()
        else:
            tensor["data"] = arr.ravel().tolist()
        inputs.append(tensor)
    if "key_lengths" in options:
        lengths = options["key_lengths"]
        inputs.append({"name": "key_lengths", "shape": [len(lengths)], "datatype": "INT64"})
        inputs[-1]["data"] = lengths
    outputs = [{"name": "output", "parameters": {"binary_data": draw(st.booleans())}}]
    header = orjson.dumps({"inputs": inputs, "parameters": params, "outputs": outputs})
    headers = {"content-type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers["inference-header-content-length"] = str(len(header))
    return Call("v2", header + raw, headers, output)


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[Any]:
    # Small cost limits, so that the 413 paths of the cost model are exercised too.
    with app_client(
        _TMP / "approx", max_elements=4096, max_flops=10**9, max_work_bytes=16 << 20
    ) as c:
        yield c


def _output(call: Call, response: Any) -> np.ndarray:
    if call.front == "v1":
        out = decode(response.json()["output"])  # nested lists (null: NaN) or b64
        return np.asarray(out, dtype=np.float64).reshape(call.output)
    length = response.headers.get("inference-header-content-length")
    header = orjson.loads(response.content[: int(length)] if length else response.content)
    out = header["outputs"][0]
    assert tuple(out["shape"]) == call.output
    if "data" in out:
        return np.array(out["data"], dtype=np.float64).reshape(call.output)
    return np.frombuffer(response.content[int(length) :], "<f4").reshape(call.output)


@fuzz_settings(APPROX_EXAMPLES)
@given(call=approx_calls())
def test_approximations_and_empty_shapes_on_both_fronts(call: Call, fuzz_client: Any) -> None:
    """Every method with its parameters (valid or not), empty and huge-but-empty shapes, values
    up to float32's limit: a documented 4xx in the front's error form, or the output of the
    shape asked for, all finite (finite inputs get finite answers)."""
    path = "/v1/attention" if call.front == "v1" else "/v2/models/attention/infer"
    response = fuzz_client.post(path, content=call.body, headers=call.headers)
    status = response.status_code
    assert status in ANSWERS, (status, response.text[:300])
    if status != 200:
        if call.front == "v1":
            problem = response.json()
            assert response.headers["content-type"] == "application/problem+json"
            assert problem["status"] == status and problem["detail"]
        else:
            assert response.headers["content-type"] == "application/json"
            assert set(response.json()) == {"error"}
        event(f"{call.front} {status}")
        return
    out = _output(call, response)
    assert np.isfinite(out).all(), "a finite input got a non-finite answer"
    event(f"{call.front} 200{' empty' if out.size == 0 else ''}")
