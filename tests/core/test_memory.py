"""Recurrent memory through the Python API: the `memory` option against the float64 reference
(tests/support/memory_reference.py: each query's visible keys and slots listed from the
definition) on every instruction set, weights and slot_weights, the options it is refused with,
and streaming: MemorySession's segments against the stateless answer, its state kept and
resumed, and bad segments refused with the session unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import service
from service.core.sessions import MemoryState
from tests.support.memory_reference import memory_reference
from tests.support.native import ISAS, isa_set
from tests.support.reference import random_qkv

ATOL = 2e-5

# (L, S, M, C, c, pool)
CASES = [
    (192, 32, 32, 0, 1, "mean"),
    (203, 48, 96, 0, 1, "mean"),
    (256, 32, 16, 4, 4, "mean"),
    (250, 40, 40, 2, 8, "max"),
    (300, 64, 128, 3, 2, "max"),
    (160, 16, 0, 6, 4, "mean"),
]


def memory(case: tuple[Any, ...]) -> dict[str, Any]:
    n, s, m, c_slots, rate, pool = case
    return {"segment": s, "length": m, "compressed": c_slots, "rate": rate, "pool": pool}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_memory_option_against_the_reference(isa: str, case: tuple[Any, ...], causal: bool):
    n = case[0]
    q, k, v = random_qkv(2, 4, 2, n, n, 16, 24, seed=n)  # GQA: 4 query heads on 2 kv heads
    mem = memory(case)
    with isa_set(isa):
        res = service.attention(q, k, v, memory=mem, causal=causal, return_weights=True)
    ref = memory_reference(q, k, v, causal=causal, **{"length" if key == "length" else key: val
                           for key, val in mem.items()})  # fmt: skip
    np.testing.assert_allclose(res.output, ref.output, atol=ATOL)
    np.testing.assert_allclose(res.lse, ref.lse, atol=ATOL)
    np.testing.assert_allclose(res.weights, ref.weights, atol=ATOL)
    slots = -(-n // case[4]) if case[3] else 0
    assert res.slot_weights.shape == (2, 4, n, slots)
    np.testing.assert_allclose(res.slot_weights, ref.slot_weights, atol=ATOL)


def test_softcap_scale_key_lengths_and_empty_rows() -> None:
    n = 150
    q, k, v = random_qkv(2, 2, 2, n, n, 8, seed=1)
    kw = dict(scale=0.3, softcap=4.0, key_lengths=[150, 20])
    for empty in ("zero", "nan"):
        res = service.attention(
            q, k, v, memory={"segment": 32, "length": 32}, causal=True, return_weights=True,
            empty_rows=empty, **kw,
        )  # fmt: skip
        ref = memory_reference(q, k, v, segment=32, length=32, causal=True, **kw)
        rows = ~np.isneginf(ref.lse)
        assert rows[0].all() and not rows[1, :, 64:].any()  # batch 1 from 64 on sees nothing
        np.testing.assert_allclose(res.output[rows], ref.output[rows], atol=ATOL)
        empty_out = res.output[~rows]
        assert (np.isnan(empty_out) if empty == "nan" else empty_out == 0).all()


def test_weights_rows_in_any_order() -> None:
    n = 200
    q, k, v = random_qkv(1, 2, 2, n, n, 16, seed=2)
    mem = {"segment": 50, "length": 50, "compressed": 2, "rate": 5}
    res = service.attention(q[0], k[0], v[0], memory=mem, weights_rows=[150, 3, 99])
    ref = memory_reference(q, k, v, segment=50, length=50, compressed=2, rate=5)
    np.testing.assert_allclose(res.weights, ref.weights[0][:, [150, 3, 99]], atol=ATOL)
    np.testing.assert_allclose(res.slot_weights, ref.slot_weights[0][:, [150, 3, 99]], atol=ATOL)
    np.testing.assert_allclose(res.lse, ref.lse[0][:, [150, 3, 99]], atol=ATOL)


def test_torch_in_torch_out_any_rank() -> None:
    q, k, v = (torch.randn(70, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    res = service.attention(q, k, v, memory={"segment": 16, "length": 8, "compressed": 1,
                                             "rate": 8}, return_weights=True)  # fmt: skip
    assert isinstance(res.output, torch.Tensor) and res.output.shape == (70, 8)
    assert res.weights.shape == (70, 70) and res.slot_weights.shape == (70, 9)
    ref = memory_reference(*(x.numpy()[None, None] for x in (q, k, v)), segment=16, length=8,
                           compressed=1, rate=8)  # fmt: skip
    np.testing.assert_allclose(res.output.numpy(), ref.output[0, 0], atol=ATOL)


@pytest.mark.parametrize(
    ("options", "loc"),
    [
        ({"window": {"left": 4}}, "window.left"),
        ({"window": {"dilation": 2}}, "window.dilation"),
        ({"mask": np.ones((64, 64), bool)}, "mask"),
        ({"global_tokens": [0]}, "global_tokens"),
        ({"alibi_slopes": True}, "alibi_slopes"),
        ({"block_mask": {"block_size": 16, "layout": np.ones((4, 4), bool)}}, "block_mask"),
        ({"cu_seqlens": [0, 64]}, "cu_seqlens"),
        ({"key_lengths": [10], "memory": {"compressed": 2, "rate": 4}}, "key_lengths"),
        ({"method": "linear"}, "memory"),
        ({"memory": {"compressed": 2}}, "memory.rate"),
        ({"memory": {"compressed": 2, "rate": 3}}, "memory.rate"),
        ({"memory": {"compressed": 1, "rate": 8, "length": 8, "segment": 12}}, "memory.segment"),
        ({"memory": {"segment": 0}}, "memory.segment"),
        ({"memory": {"pool": "sum"}}, "memory.pool"),
    ],
)
def test_refusals_name_the_option(options: dict[str, Any], loc: str) -> None:
    q = np.zeros((64, 8), np.float32)
    mem = {"segment": 16, "length": 16, **options.pop("memory", {})}
    with pytest.raises(service.InputError) as err:
        service.attention(q, q, q, memory=mem, **options)
    assert ".".join(map(str, err.value.loc)) == loc, err.value


def test_lengths_must_agree() -> None:
    q = np.zeros((64, 8), np.float32)
    with pytest.raises(service.InputError, match="k has 32 positions and q 64") as err:
        service.attention(q, q[:32], q[:32], memory={"segment": 16, "length": 16})
    assert err.value.loc == ("k",)


# ---------------------------------------------------------------------------------------------
# Sessions


STREAMS = [
    ({"length": 64, "compressed": 8, "rate": 4, "pool": "mean"}, True),
    ({"length": 48, "compressed": 3, "rate": 8, "pool": "max"}, False),
    ({"length": 40}, True),
]


@pytest.mark.parametrize(("spec", "causal"), STREAMS)
def test_sixteen_segments_equal_the_stateless_answer(spec: dict[str, Any], causal: bool) -> None:
    s = 32 if spec.get("compressed") else 30
    n = 16 * s - (8 if spec.get("compressed") else 7)  # the last segment shorter
    q, k, v = random_qkv(1, 4, 2, n, n, 16, seed=7)
    session = service.MemorySession(spec, causal=causal)
    outs, weights = [], []
    for p in range(0, n, s):
        part = [x[:, :, p : p + s] for x in (q, k, v)]
        res = session.append(*part, return_weights=True)
        assert res.position == min(n, p + s)
        assert res.memory_raw == min(p, spec["length"])
        outs.append(res.output)
        weights.append((res.weights, res.memory_compressed, res.memory_raw))
    assert len(outs) == 16
    whole = service.attention(q, k, v, memory={**spec, "segment": s}, causal=causal,
                              return_weights=True)  # fmt: skip
    np.testing.assert_allclose(np.concatenate(outs, axis=2), whole.output, atol=1e-5)
    # The last segment's weights over [compressed | memory | segment] are the stateless row's.
    w, c_seen, m_seen = weights[-1]
    start = 15 * s
    np.testing.assert_allclose(
        w[..., c_seen + m_seen :], whole.weights[:, :, start:, start:], atol=1e-5
    )
    np.testing.assert_allclose(
        w[..., c_seen : c_seen + m_seen], whole.weights[:, :, start:, start - m_seen : start],
        atol=1e-5,
    )  # fmt: skip
    if c_seen:
        slots = whole.slot_weights[:, :, start:]
        first = (start - spec["length"]) // spec["rate"] - c_seen
        np.testing.assert_allclose(w[..., :c_seen], slots[..., first : first + c_seen], atol=1e-5)
    state = session.state
    assert state.raw == spec["length"] and state.compressed == spec.get("compressed", 0)
    assert state.nbytes == 4 * 2 * (state.raw + state.compressed) * (16 + 16)  # (M + C) only


def test_a_session_resumes_from_its_bytes() -> None:
    spec = {"length": 16, "compressed": 2, "rate": 4}
    q, k, v = random_qkv(1, 2, 2, 128, 128, 8, seed=9)
    whole = service.attention(q, k, v, memory={**spec, "segment": 32}, causal=True).output
    first = service.MemorySession(spec, causal=True)
    first.append(q[:, :, :32], k[:, :, :32], v[:, :, :32])
    first.append(q[:, :, 32:64], k[:, :, 32:64], v[:, :, 32:64])
    saved = first.state.to_bytes()
    state, _ = MemoryState.from_bytes(saved)
    assert state.position == 64 and state.options.causal is True
    second = service.MemorySession.resume(saved)
    outs = [second.append(q[:, :, p : p + 32], k[:, :, p : p + 32], v[:, :, p : p + 32]).output
            for p in (64, 96)]  # fmt: skip
    np.testing.assert_allclose(np.concatenate(outs, axis=2), whole[:, :, 64:], atol=1e-5)


def test_bad_segments_leave_the_session_unchanged() -> None:
    session = service.MemorySession({"length": 8, "compressed": 2, "rate": 4}, scale=0.5)
    q = np.ones((2, 8, 16), np.float32)
    session.append(q, q, q)
    before = session.state
    bad = [
        ((q[:1], q[:1], q[:1]), "q", "query heads 1 differs"),
        ((q[:, :6], q[:, :6], q[:, :6]), "q", "not a multiple of memory.rate=4"),
        ((q, q[:, :4], q[:, :4]), "k", "its own positions"),
        ((q[:, :, :8], q[:, :, :8], q[:, :, :8]), "q", "head dim 8 differs"),
        ((q[None], q[None], q[None]), "q", "rank 4 differs"),
        ((q[:, :0], q[:, :0], q[:, :0]), "q", "at least one position"),
        ((q, q, np.ones((2, 8, 4), np.float32)), "v", "value dim 4 differs"),
    ]
    for args, loc, message in bad:
        with pytest.raises(service.InputError, match=message) as err:
            session.append(*args)
        assert err.value.loc == (loc,)
        assert session.state is before
    assert session.append(q, q, q).position == 16


def test_session_options_are_checked() -> None:
    with pytest.raises(service.InputError) as err:
        service.MemorySession({"length": 6, "compressed": 1, "rate": 4})
    assert err.value.loc == ("memory", "rate")
    with pytest.raises(service.InputError) as err:
        service.MemorySession({"length": 6, "segment": 12})
    assert err.value.loc == ("memory", "segment")  # a session's segments are its appends
    with pytest.raises(service.InputError) as err:
        service.MemorySession({"length": 6}, scale=float("inf"))
    assert err.value.loc == ("scale",)
