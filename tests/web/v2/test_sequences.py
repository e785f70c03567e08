"""Recurrent memory on the Open Inference Protocol front, through the real tritonclient against a
real server: the memory_* parameters of model `attention` (with the slot_weights output), and
Triton's sequences (sequence_id, sequence_start, sequence_end) streaming the same memory request
by request, equal to the one-call answer. Errors name the protocol's parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

import service
from tests.support.http import app_client
from tests.support.stores import StoreBackend
from tests.web.v2.test_sparse import infer

SERVER_ENV = {"ATTN_MAX_ELEMENTS": "200000"}
BOTH_STORES = True  # every test on the file store and on a real Redis
MEMORY = {"memory_length": 32, "memory_compressed": 3, "memory_rate": 8, "memory_pool": "max"}
SPEC = {"length": 32, "compressed": 3, "rate": 8, "pool": "max"}


def qkv(seed: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal((1, 2, n, 16)).astype(np.float32) for name in "qkv"}


def part(x: dict[str, np.ndarray], p: int, n: int) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(a[:, :, p : p + n]) for name, a in x.items()}


def sequence(
    tc: triton.InferenceServerClient,
    x: dict[str, np.ndarray],
    sid: int | str,
    s: int,
    params: dict[str, Any],
) -> list[dict[str, Any]]:
    """Streams x through sequence `sid` in requests of s positions; each result's parameters."""
    n = x["q"].shape[2]
    answers = []
    for p in range(0, n, s):
        result = tc.infer(
            "attention",
            [triton.InferInput(k, list(a.shape), "FP32").set_data_from_numpy(a)
             for k, a in part(x, p, s).items()],
            sequence_id=sid,
            sequence_start=p == 0,
            sequence_end=p + s >= n,
            parameters=params if p == 0 else None,
        )  # fmt: skip
        answers.append({"output": result.as_numpy("output"), **result.get_response()["parameters"]})
    return answers


@pytest.mark.parametrize("sid", [42, "stream-é"])
def test_a_sequence_of_sixteen_requests_equals_the_one_call(tc, sid: int | str) -> None:
    s, n = 16, 16 * 16
    x = qkv(1, n)
    answers = sequence(tc, x, sid, s, {**MEMORY, "causal": True})
    assert [a["sequence_position"] for a in answers] == list(range(s, n + 1, s))
    assert answers[-1]["memory_raw"] == 32 and answers[-1]["memory_compressed"] == 3
    got = np.concatenate([a["output"] for a in answers], axis=2)
    whole, _ = infer(tc, x, {"memory_segment": s, **MEMORY, "causal": True})
    np.testing.assert_allclose(got, whole["output"], atol=1e-5)
    want = service.attention(**x, memory={**SPEC, "segment": s}, causal=True).output
    np.testing.assert_allclose(got, want, atol=1e-5)
    # sequence_end dropped the state: the id is unknown now.
    with pytest.raises(InferenceServerException, match="no sequence") as err:
        tc.infer("attention", [triton.InferInput(k, [1, 2, 16, 16], "FP32").set_data_from_numpy(a)
                               for k, a in part(x, 0, 16).items()], sequence_id=sid)  # fmt: skip
    assert err.value.status() == "404"


def test_interleaved_sequences_keep_their_own_memory(tc) -> None:
    x, y = qkv(2, 64), qkv(3, 64)
    outs: dict[int, list[np.ndarray]] = {7: [], 8: []}
    for p in range(0, 64, 16):
        for sid, data in ((7, x), (8, y)):
            result = tc.infer(
                "attention",
                [triton.InferInput(k, [1, 2, 16, 16], "FP32").set_data_from_numpy(a)
                 for k, a in part(data, p, 16).items()],
                sequence_id=sid, sequence_start=p == 0, sequence_end=p == 48,
                parameters={"memory_length": 16} if p == 0 else None,
            )  # fmt: skip
            outs[sid].append(result.as_numpy("output"))
    for sid, data in ((7, x), (8, y)):
        want = service.attention(**data, memory={"segment": 16, "length": 16}).output
        np.testing.assert_allclose(np.concatenate(outs[sid], axis=2), want, atol=1e-5)


def test_memory_parameters_and_slot_weights(tc) -> None:
    x = qkv(4, 100)
    params = {"memory_segment": 20, "memory_length": 24, "memory_compressed": 2,
              "memory_rate": 4, "return_weights": True}  # fmt: skip
    got, names = infer(tc, x, params)
    assert names == ["output", "weights", "lse", "slot_weights"]
    want = service.attention(**x, memory={"segment": 20, "length": 24, "compressed": 2,
                             "rate": 4}, return_weights=True)  # fmt: skip
    np.testing.assert_allclose(got["output"], want.output, atol=1e-6)
    np.testing.assert_allclose(got["weights"], want.weights, atol=1e-6)
    np.testing.assert_allclose(got["slot_weights"], want.slot_weights, atol=1e-6)
    assert got["slot_weights"].shape == (1, 2, 100, 25)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"memory_segment": 20, "memory_length": 6, "memory_compressed": 1, "memory_rate": 4},
         "memory_rate: 4 must divide length 6"),
        ({"memory_segment": 20, "memory_length": 8, "memory_compressed": 1, "memory_rate": 8},
         "memory_segment: must be a multiple of rate 8"),
        ({"memory_segment": 20, "memory_length": 8, "window_left": 2}, "window_left"),
        ({"memory_length": 8}, "memory_segment"),
    ],
)  # fmt: skip
def test_bad_memory_parameters(tc, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InferenceServerException, match=message) as err:
        infer(tc, qkv(5, 40), params)
    assert err.value.status() == "400"


def test_bad_sequence_requests(tc) -> None:
    x = part(qkv(6, 32), 0, 16)
    inputs = [triton.InferInput(k, [1, 2, 16, 16], "FP32").set_data_from_numpy(a)
              for k, a in x.items()]  # fmt: skip
    cases = [
        ({"sequence_id": 9, "sequence_start": True,
          "parameters": {"memory_length": 8, "memory_segment": 16}}, "400", "memory_segment"),
        ({"sequence_id": 9, "sequence_start": True,
          "parameters": {"memory_length": 8, "window_left": 1}}, "400", "window_left"),
        ({"sequence_id": 9, "sequence_start": True,
          "parameters": {"memory_length": 6, "memory_compressed": 1, "memory_rate": 4}},
         "400", "memory_rate"),
        ({"sequence_id": 10}, "404", "no sequence 10"),
    ]  # fmt: skip
    for kw, status, message in cases:
        with pytest.raises(InferenceServerException, match=message) as err:
            tc.infer("attention", inputs, **kw)
        assert err.value.status() == status
    # A started sequence refuses the start's parameters and other models refuse sequences.
    tc.infer("attention", inputs, sequence_id=11, sequence_start=True,
             parameters={"memory_length": 8})  # fmt: skip
    with pytest.raises(InferenceServerException, match="sets the sequence's options"):
        tc.infer("attention", inputs, sequence_id=11, parameters={"memory_length": 4})
    r = tc.infer("attention", inputs, sequence_id=11, sequence_end=True)
    assert r.get_response()["parameters"]["sequence_position"] == 32
    query = triton.InferInput("query", [1, 16, 8], "FP32").set_data_from_numpy(
        np.ones((1, 16, 8), np.float32)
    )
    with pytest.raises(InferenceServerException, match="model 'multihead' is stateless"):
        tc.infer("multihead", [query], sequence_id=12, sequence_start=True,
                 parameters={"num_heads": 2})  # fmt: skip


def test_a_sequence_belongs_to_its_api_key(tmp_path: Path, store_backend: StoreBackend) -> None:
    keys = ("alpha-key-0123456789", "beta-key-9876543210")
    x = part(qkv(7, 16), 0, 16)
    inputs = [{"name": k, "shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}
              for k, a in x.items()]  # fmt: skip
    with app_client(tmp_path, api_keys=keys, **store_backend.settings()) as c:

        def call(key: str, **params: Any) -> Any:
            body = {"inputs": inputs, "parameters": {"sequence_id": 5, **params}}
            return c.post("/v2/models/attention/infer", json=body,
                          headers={"authorization": f"Bearer {key}"})  # fmt: skip

        assert call(keys[0], sequence_start=True, memory_length=8).status_code == 200
        other = call(keys[1])  # the same id under another key is another (unknown) sequence
        assert other.status_code == 404 and "no sequence 5" in other.json()["error"]
        assert call(keys[1], sequence_start=True, memory_length=4).status_code == 200
        mine = call(keys[0], sequence_end=True)
        assert mine.status_code == 200
        assert mine.json()["parameters"]["sequence_position"] == 32
        assert mine.json()["parameters"]["memory_raw"] == 8  # key 0's memory, not key 1's
