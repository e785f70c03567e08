"""Approximate attention (service/core/approx/) against float64 torch references of each formula.

The references materialise the Lq x Lk matrix of each method the plain way (phi(Q) phi(K)^T
normalised, causality and padding through tests/support/reference.py's allowed matrix, performer and
linformer with the same random features / projections rebuilt from the seed), so they share
no code path with the chunked products under test.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch

import service
from service.core import approx, cancel
from service.core.approx import methods
from service.core.errors import InputError
from service.core.options import AttentionOptions
from tests.support.reference import (
    bin_means,
    random_qkv,
    reference_attention,
    reference_output,
)

CAUSAL = [False, "top_left", "bottom_right"]
# (method, causal) pairs that exist: linformer is non-causal
METHOD_CAUSAL = [(m, c) for m in ("linear", "performer") for c in CAUSAL] + [("linformer", False)]


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def qkv(
    b: int, hq: int, hkv: int, lq: int, lk: int, d: int = 8, dv: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 inputs, so that tolerances are tight."""
    return random_qkv(b, hq, hkv, lq, lk, d, dv, seed=seed, dtype=None)


def run(q, k, v, chunk: int = approx.CHUNK, **options: Any) -> approx.ApproxResult:
    return approx.run(q, k, v, AttentionOptions(**options), chunk=chunk)


# ---------------------------------------------------------------------------------------------
# Each method against its own plain formula (float64 in, so tolerances are tight)


@pytest.mark.parametrize("method", ["linear", "performer"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize(
    "shape, chunk",
    [
        ((1, 1, 1, 23, 23), 7),  # L not a multiple of the chunk
        ((2, 4, 2, 19, 30), 8),  # GQA, Lq < Lk
        ((1, 2, 1, 30, 19), 5),  # Lq > Lk: some rows see no key when bottom-right causal
        ((1, 1, 1, 130, 130), approx.CHUNK),  # the default chunk, over more than two chunks
    ],
)
def test_feature_methods_match_reference(method, causal, shape, chunk) -> None:
    b, hq, hkv, lq, lk = shape
    q, k, v = qkv(b, hq, hkv, lq, lk)
    extra = {"num_features": 24, "seed": 3} if method == "performer" else {}
    res = run(q, k, v, chunk, method=method, causal=causal, return_weights=True, **extra)
    out, w, lse = reference_output(method, q, k, v, causal=causal, **extra)
    np.testing.assert_allclose(res.output, out, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.weights, w, rtol=1e-9, atol=1e-12)
    finite = np.isfinite(lse)
    assert np.array_equal(np.isfinite(res.lse), finite)
    np.testing.assert_allclose(res.lse[finite], lse[finite], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method, causal", [mc for mc in METHOD_CAUSAL if mc[1] != "bottom_right"])
def test_key_lengths_and_empty_rows(method, causal) -> None:
    q, k, v = qkv(3, 2, 2, 21, 21)
    lengths = [21, 9, 0]
    res = run(q, k, v, 6, method=method, causal=causal, key_lengths=lengths)
    out, _, _ = reference_output(method, q, k, v, causal=causal, key_lengths=lengths)
    np.testing.assert_allclose(res.output, out, rtol=1e-9, atol=1e-12)
    assert not res.output[2].any()  # no keys at all: zero rows
    nan = run(q, k, v, 6, method=method, causal=causal, key_lengths=lengths, empty_rows="nan")
    assert np.isnan(nan.output[2]).all() and not np.isnan(nan.output[:2]).any()
    # padded keys contribute nothing: changing them changes nothing
    k2, v2 = k.copy(), v.copy()
    k2[1, :, 9:] += 5.0
    v2[1, :, 9:] -= 7.0
    res2 = run(q, k2, v2, 6, method=method, causal=causal, key_lengths=lengths)
    np.testing.assert_allclose(res2.output, res.output, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 1, 1, 17, 40), (2, 4, 2, 33, 50), (1, 2, 1, 300, 300)])
def test_linformer_matches_reference(shape) -> None:
    b, hq, hkv, lq, lk = shape
    q, k, v = qkv(b, hq, hkv, lq, lk)
    for kk, seed in [(None, None), (7, 5)]:
        res = run(q, k, v, method="linformer", linformer_k=kk, seed=seed, scale=0.3)
        out, _, _ = reference_output(
            "linformer", q, k, v, scale=0.3, linformer_k=kk, seed=seed or 0
        )
        np.testing.assert_allclose(res.output, out, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Implied attention maps (compare), pooled without forming Lq x Lk


@pytest.mark.parametrize("method, causal", METHOD_CAUSAL)
@pytest.mark.parametrize("side", [5, 12, 64])
def test_pooled_implied_map(monkeypatch, method, causal, side) -> None:
    monkeypatch.setattr(methods, "MAP_SIDE", side)
    q, k, v = qkv(2, 2, 1, 29, 37)
    lengths = [37, 20]
    opts = AttentionOptions(method=method, causal=causal, key_lengths=lengths, compare=True)
    f_map = methods.compute(q, k, v, opts, (min(29, side), min(37, side)), 6)[3]
    _, m, _ = reference_output(method, q, k, v, causal=causal, key_lengths=lengths)
    np.testing.assert_allclose(f_map, bin_means(m, min(29, side), min(37, side)), atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Performer approximates softmax attention; reproducible per seed


def test_performer_error_decreases_with_features() -> None:
    """Relative output error against exact softmax attention, averaged over seeds.

    FAVOR+'s variance grows like exp(|x + y|^2) (x = q / D^(1/4)), so q and k have entries of
    std 0.5 here; with std 1 at D = 16 it needs far more features for the same error.
    """
    d, length = 16, 64
    errors = {}
    for m in (16, 128, 2048):
        errs = []
        for seed in range(4):
            q, k, v = qkv(1, 1, 1, length, length, d=d, dv=d, seed=100 + seed)
            q, k = 0.5 * q, 0.5 * k
            exact = reference_attention(q, k, v).output.numpy()
            out = run(q, k, v, method="performer", num_features=m, seed=seed).output
            errs.append(np.linalg.norm(out - exact) / np.linalg.norm(exact))
        errors[m] = float(np.mean(errs))
    assert errors[16] > errors[128] > errors[2048], errors
    assert errors[2048] < 0.5 * errors[128], errors  # Monte Carlo: about 1 / sqrt(m)
    assert errors[2048] < 0.2, errors


def test_performer_features_are_orthogonal_blocks() -> None:
    w = approx.performer_features(8, 20, seed=1)
    assert w.shape == (20, 8)
    for block in (w[:8], w[8:16]):  # rows of a block: orthogonal directions
        unit = block / np.linalg.norm(block, axis=1, keepdims=True)
        np.testing.assert_allclose(unit @ unit.T, np.eye(8), atol=1e-12)


def test_reproducible_per_seed() -> None:
    q, k, v = qkv(1, 2, 2, 40, 40)
    for method, param in (("performer", "num_features"), ("linformer", "linformer_k")):
        a = run(q, k, v, method=method, seed=7, **{param: 16}).output
        b = run(q, k, v, method=method, seed=7, **{param: 16}).output
        c = run(q, k, v, method=method, seed=8, **{param: 16}).output
        assert np.array_equal(a, b)
        assert not np.allclose(a, c)


def test_performer_stabilised_in_float32() -> None:
    """Norms whose exp(x W) overflows float32 unless shifted: still finite and right."""
    q, k, v = qkv(1, 1, 1, 50, 50, d=16, dv=4, seed=4)
    q, k = 12 * q, 12 * k  # |x|^2 / 2 ~ 280 after the D^(1/4) scaling: exp overflows float32
    res = service.attention(
        q.astype(np.float32),
        k.astype(np.float32),
        v.astype(np.float32),
        method="performer",
        num_features=64,
    )
    out, _, _ = reference_output("performer", q, k, v, num_features=64)
    assert np.isfinite(res.output).all()
    np.testing.assert_allclose(res.output, out, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# The Python API dispatches to approx: ranks, types, GQA, compare


@pytest.mark.parametrize("method", ["linear", "performer", "linformer"])
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_api_ranks_and_types(method, rank) -> None:
    q, k, v = qkv(2, 4, 2, 70, 70)
    causal = method != "linformer"
    out, _, _ = reference_output(method, q, k, v, causal=causal)
    if rank < 4:  # rank 3: batch item 0 (GQA heads kept); rank 2: its first head
        idx = (0,) if rank == 3 else (0, 0)
        q, k, v, out = q[idx], k[idx], v[idx], out[idx]
    res = service.attention(q.astype(np.float32), k, v, method=method, causal=causal)
    assert res.method == method and res.output.shape == out.shape
    assert res.output.dtype == np.float32 and res.flops > 0 and res.elapsed_ms >= 0
    np.testing.assert_allclose(res.output, out, rtol=1e-4, atol=1e-5)
    t = service.attention(*(torch.from_numpy(a) for a in (q, k, v)), method=method, causal=causal)
    assert isinstance(t.output, torch.Tensor)
    np.testing.assert_allclose(t.output.numpy(), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["linear", "performer", "linformer"])
def test_compare(monkeypatch, method) -> None:
    monkeypatch.setattr(methods, "MAP_SIDE", 16)
    q, k, v = qkv(2, 2, 2, 40, 48, seed=9)
    causal = method != "linformer"
    res = service.attention(
        q, k, v, method=method, causal=causal, key_lengths=[48, 30], compare=True
    )
    exact = reference_attention(q, k, v, causal=causal, key_lengths=[48, 30])
    diff = res.output - exact.output.numpy()
    cmp = res.comparison
    assert cmp["method"] == method and cmp["pooled"]
    np.testing.assert_allclose(
        cmp["rel_error"], np.linalg.norm(diff) / np.linalg.norm(exact.output), rtol=1e-4
    )
    np.testing.assert_allclose(cmp["max_abs_error"], np.abs(diff).max(), rtol=1e-3, atol=1e-6)
    assert cmp["rel_error_per_head"].shape == (2, 2)
    _, m, _ = reference_output(method, q, k, v, causal=causal, key_lengths=[48, 30])
    np.testing.assert_allclose(cmp["implied_map"], bin_means(m, 16, 16), atol=1e-6)
    np.testing.assert_allclose(
        cmp["exact_map"], bin_means(exact.weights.numpy(), 16, 16), atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Unsupported combinations: InputError naming the method and the option

UNSUPPORTED_VALUES: dict[str, dict[str, Any]] = {
    "scale": {"scale": 0.5},
    "causal": {"causal": True},
    "mask": {"mask": np.ones((8, 8), dtype=bool)},
    "key_lengths": {"key_lengths": [8]},
    "window": {"window": {"left": 2, "right": 2}},
    "window.dilation": {"window": {"left": 2, "right": 2, "dilation": 2}},
    "global_tokens": {"global_tokens": [0]},
    "alibi_slopes": {"alibi_slopes": True},
    "softcap": {"softcap": 5.0},
    "return_weights": {"return_weights": True},
    "compare": {"compare": True},
    "num_features": {"num_features": 8},
    "seed": {"seed": 1},
    "linformer_k": {"linformer_k": 4},
    "out_dtype": {"out_dtype": "input"},
    "precision": {"precision": "bf16"},
}


def unsupported_cases() -> list[tuple[str, str]]:
    cases = []
    for method, supported in approx.SUPPORTED.items():
        for option in UNSUPPORTED_VALUES:
            if option.split(".")[0] not in supported:
                cases.append((method, option))
    return cases


@pytest.mark.parametrize("method, option", unsupported_cases())
def test_unsupported_combination(method, option) -> None:
    q, k, v = qkv(1, 1, 1, 8, 8)
    with pytest.raises(InputError) as info:
        service.attention(q[0], k[0], v[0], method=method, **UNSUPPORTED_VALUES[option])
    msg = str(info.value)
    first = option.split(".")[0]
    assert repr(method) in msg and first in msg, msg
    assert info.value.loc[0] in (first, "window"), info.value.loc
    if option == "window.dilation":
        assert info.value.loc == ("window", "dilation")


def test_linformer_causal_message() -> None:
    q, k, v = qkv(1, 1, 1, 8, 8)
    with pytest.raises(InputError, match="'linformer' does not support 'causal'"):
        service.attention(q, k, v, method="linformer", causal="bottom_right")


def test_option_values_checked() -> None:
    q, k, v = qkv(1, 1, 1, 8, 8)
    cases = [
        ("performer", "num_features", 0),
        ("linformer", "linformer_k", -1),
        ("performer", "seed", -3),
        ("flash", "causal", False),
    ]
    for method, field, value in cases:
        with pytest.raises(InputError) as info:
            service.attention(q, k, v, method=method, **{field: value})
        assert info.value.loc == ((field,) if method != "flash" else ("method",))


def test_support_table_matches_the_issue() -> None:
    """The documented limits: per-(query, key) options are exact-only; linformer is
    non-causal and has no key-by-key weights; compare needs an approximation."""
    per_cell = {"mask", "window", "global_tokens", "alibi_slopes", "softcap"}
    for method in ("linear", "performer", "linformer"):
        assert not per_cell & approx.SUPPORTED[method], method
        assert {"key_lengths", "compare"} <= approx.SUPPORTED[method], method
    assert {"causal", "return_weights"} <= approx.SUPPORTED["linear"] & approx.SUPPORTED[
        "performer"
    ]
    assert not {"causal", "return_weights"} & approx.SUPPORTED["linformer"]
    assert "compare" not in approx.SUPPORTED["exact"]


# Each approximation's work, set-up included, runs in steps with a cancellation checkpoint
# before each: a job abandoned 50 ms into about a second of work raises Cancelled part-way
# (a method without checkpoints would run to the end and return its result).
ABANDONED = {
    "linear": ("linear", (262_144, 64), {}),
    "linear, causal (chunks)": ("linear", (65_536, 64), {"causal": "top_left"}),
    "performer": ("performer", (65_536, 64), {"num_features": 1024, "seed": 1401}),
    "performer's set-up (16 QRs of 1024 x 1024)": (
        "performer",
        (1, 1024),
        {"num_features": 16384, "seed": 1402},  # a seed of its own: not cached
    ),
    "linformer": ("linformer", (262_144, 64), {"linformer_k": 256}),
}


@pytest.mark.parametrize("name", list(ABANDONED))
def test_an_abandoned_approximation_stops_at_a_checkpoint(name: str) -> None:
    method, shape, options = ABANDONED[name]
    q = np.full(shape, 0.01, dtype=np.float32)
    token = cancel.CancelToken()
    timer = threading.Timer(0.05, token.cancel, ("timeout",))
    with cancel.bound(token):
        timer.start()
        try:
            with pytest.raises(cancel.Cancelled, match="timeout"):
                service.attention(q, q, q, method=method, **options)
        finally:
            timer.cancel()
