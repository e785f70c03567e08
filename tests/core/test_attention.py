"""service.attention against the float64 reference (tests/support/reference.py) and torch's
own SDPA."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import service
from service import InputError
from tests.support.reference import random_qkv, reference_attention

ATOL = 1e-4  # outputs and lse of O(1) scale
WEIGHT_ATOL = 1e-5  # probabilities are <= 1

# (B, Hq, Hkv, Lq, Lk, D, Dv): tile-unfriendly lengths, L = 1, Lq != Lk both ways, GQA, Dv != D.
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (2, 2, 2, 7, 7, 16, 16),
    (1, 2, 1, 65, 65, 64, 64),
    (1, 1, 1, 130, 130, 16, 16),
    (2, 4, 2, 7, 13, 80, 80),
    (1, 2, 2, 13, 7, 128, 128),
    (1, 6, 3, 65, 33, 64, 32),
    (2, 3, 1, 33, 130, 16, 16),
]

Shape = tuple[int, int, int, int]  # (B, Hq, Lq, Lk)
OptionMaker = Callable[[Shape, np.random.Generator], dict[str, Any]]


def _key_lengths(s: Shape, rng: np.random.Generator) -> list[int]:
    # The first item is fully padded when B > 1: its rows have no allowed key.
    lengths = rng.integers(1, s[3] + 1, size=s[0]).tolist()
    if s[0] > 1:
        lengths[0] = 0
    return lengths


def _bool_mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return rng.random(shape) < 0.7


def _float_mask(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    m = rng.normal(0.0, 0.5, size=shape)
    m[rng.random(shape) < 0.2] = -np.inf
    return m


def _globals(s: Shape, rng: np.random.Generator) -> list[int]:
    return sorted({0, s[3] // 2, s[3] - 1})


OPTIONS: dict[str, OptionMaker] = {
    "plain": lambda s, r: {},
    "scale": lambda s, r: {"scale": 0.3},
    "causal_top_left": lambda s, r: {"causal": True},
    "causal_bottom_right": lambda s, r: {"causal": "bottom_right"},
    "window": lambda s, r: {"window": {"left": 3, "right": 0}},
    "window_dilated": lambda s, r: {"window": {"left": 2, "right": 3, "dilation": 2}},
    "window_right_only": lambda s, r: {"window": {"right": 1, "dilation": 3}},
    "window_huge": lambda s, r: {"window": {"left": 10**12, "right": 10**12}},
    "global_tokens": lambda s, r: {
        "window": {"left": 1, "right": 1},
        "global_tokens": _globals(s, r),
    },
    "global_tokens_no_window": lambda s, r: {"global_tokens": _globals(s, r)},  # no effect
    "key_lengths": lambda s, r: {"key_lengths": _key_lengths(s, r)},
    "bool_mask_full": lambda s, r: {"mask": _bool_mask(s, r)},
    "bool_mask_2d": lambda s, r: {"mask": _bool_mask(s[2:], r)},
    "bool_mask_key_padding": lambda s, r: {"mask": _bool_mask((s[0], 1, 1, s[3]), r)},
    "bool_mask_ignore": lambda s, r: {"mask": _bool_mask(s, r), "mask_convention": "ignore"},
    "float_mask": lambda s, r: {"mask": _float_mask((s[0], 1, s[2], s[3]), r)},
    "float_mask_per_row": lambda s, r: {"mask": _float_mask((s[2], 1), r)},  # stride 0 on Lk
    "bool_mask_per_head_row": lambda s, r: {"mask": _bool_mask((1, s[1], s[2], 1), r)},
    "float16_mask": lambda s, r: {"mask": _float_mask(s[2:], r).astype(np.float16)},
    "alibi_standard": lambda s, r: {"alibi_slopes": True},
    "alibi_list": lambda s, r: {"alibi_slopes": r.uniform(0.01, 0.5, size=s[1]).tolist()},
    "softcap": lambda s, r: {"softcap": 1.0},
    "causal_br+window+lengths": lambda s, r: {
        "causal": "bottom_right",
        "window": {"left": 4, "right": 0},
        "key_lengths": _key_lengths(s, r),
    },
    "causal_tl+float_mask+alibi+softcap": lambda s, r: {
        "causal": True,
        "mask": _float_mask(s[2:], r),
        "alibi_slopes": True,
        "softcap": 2.0,
        "scale": 0.5,
    },
    "dilated+global+bool_mask": lambda s, r: {
        "window": {"left": 3, "right": 2, "dilation": 2},
        "global_tokens": _globals(s, r),
        "mask": _bool_mask((s[0], 1, s[2], s[3]), r),
        "mask_convention": "ignore",
    },
    "everything": lambda s, r: {
        "causal": "bottom_right",
        "mask": _float_mask((1, s[1], s[2], s[3]), r),
        "key_lengths": _key_lengths(s, r),
        "window": {"left": 5, "right": 1, "dilation": 2},
        "global_tokens": _globals(s, r),
        "alibi_slopes": r.uniform(0.01, 0.5, size=s[1]).tolist(),
        "softcap": 3.0,
    },
}


def assert_matches(result: service.AttentionResult, q, k, v, **opts: Any) -> None:
    """Output, weights and lse agree with the float64 reference; weight rows sum to 1 (or 0)."""
    ref = reference_attention(q, k, v, **opts)
    out = np.asarray(result.output)
    np.testing.assert_allclose(out, ref.output.numpy(), atol=ATOL, rtol=0)
    if result.weights is not None:
        w = np.asarray(result.weights)
        np.testing.assert_allclose(w, ref.weights.numpy(), atol=WEIGHT_ATOL, rtol=0)
        nonempty = torch.isfinite(ref.lse).numpy()  # float -inf can empty a row too
        np.testing.assert_allclose(w.sum(-1), nonempty.astype(float), atol=1e-5)
        np.testing.assert_allclose(np.asarray(result.lse), ref.lse.numpy(), atol=ATOL, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_reference(option: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng([zlib.crc32(option.encode()), *shape])
    q, k, v = random_qkv(*shape, seed=rng)
    b, hq, _, lq, lk, _, _ = shape
    opts = OPTIONS[option]((b, hq, lq, lk), rng)
    result = service.attention(q, k, v, return_weights=True, **opts)
    assert result.output.shape == (b, hq, lq, shape[6])
    assert result.weights.shape == (b, hq, lq, lk)
    assert result.lse.shape == (b, hq, lq)
    assert result.output.dtype == np.float32
    assert result.method == "exact"
    assert result.flops == 2 * b * hq * lq * lk * (shape[5] + shape[6])
    assert result.elapsed_ms >= 0
    window = opts.get("window")
    if window and window.get("left") == 10**12:
        opts = {**opts, "window": {"left": None, "right": None}}
    assert_matches(result, q, k, v, **opts)


@pytest.mark.parametrize("option", ["plain", "everything", "bool_mask_full"])
def test_weights_do_not_change_output(option: str) -> None:
    rng = np.random.default_rng(1)
    shape = (2, 4, 2, 65, 70, 64, 64)
    q, k, v = random_qkv(*shape, seed=rng)
    opts = OPTIONS[option]((2, 4, 65, 70), rng)
    without = service.attention(q, k, v, **opts)
    with_weights = service.attention(q, k, v, return_weights=True, **opts)
    assert without.weights is None and without.lse is None
    np.testing.assert_allclose(without.output, with_weights.output, atol=1e-6, rtol=0)


def test_fully_masked_rows_are_zero_or_nan() -> None:
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(2, 2, 2, 5, 6, 16, 16, seed=rng)
    mask = np.ones((5, 6), dtype=bool)
    mask[1] = False  # row 1 sees nothing
    opts = {"mask": mask, "key_lengths": [6, 0]}  # batch item 1 sees nothing at all
    zero = service.attention(q, k, v, return_weights=True, **opts)
    assert_matches(zero, q, k, v, **opts)
    assert not np.isnan(zero.output).any() and np.isneginf(zero.lse[:, :, 1]).all()
    assert (zero.output[:, :, 1] == 0).all() and (zero.output[1] == 0).all()
    assert (zero.weights[1] == 0).all()
    nan = service.attention(q, k, v, return_weights=True, empty_rows="nan", **opts)
    empty = np.zeros((2, 2, 5), dtype=bool)
    empty[:, :, 1] = True
    empty[1] = True
    np.testing.assert_array_equal(np.isnan(nan.output).all(-1), empty)
    np.testing.assert_array_equal(np.isnan(nan.weights).all(-1), empty)
    np.testing.assert_array_equal(nan.output[~empty], zero.output[~empty])
    # torch 2.13's SDPA gives 0 on such rows too (nn.MultiheadAttention gives NaN: see
    # test_multihead.py).
    torch_mask = torch.from_numpy(mask & (np.arange(6) < np.array([6, 0])[:, None, None, None]))
    expected = F.scaled_dot_product_attention(
        *(torch.from_numpy(a).double() for a in (q, k, v)), attn_mask=torch_mask
    )
    np.testing.assert_allclose(zero.output, expected.numpy(), atol=ATOL, rtol=0)


def test_zero_keys_give_empty_rows() -> None:
    q = np.ones((1, 2, 3, 8), np.float32)
    k = np.ones((1, 2, 0, 8), np.float32)
    v = np.ones((1, 2, 0, 5), np.float32)
    result = service.attention(q, k, v, return_weights=True)
    assert result.output.shape == (1, 2, 3, 5) and (result.output == 0).all()
    assert result.weights.shape == (1, 2, 3, 0) and np.isneginf(result.lse).all()


def test_zero_queries_give_empty_output() -> None:
    q = np.ones((1, 2, 0, 8), np.float32)
    k = v = np.ones((1, 2, 4, 8), np.float32)
    assert service.attention(q, k, v).output.shape == (1, 2, 0, 8)


# ---------------------------------------------------------------------------------------------
# Ranks, dtypes, torch interop


@pytest.mark.parametrize("option", ["plain", "causal_bottom_right", "everything", "bool_mask_2d"])
@pytest.mark.parametrize("rank", [2, 3])
def test_lower_ranks(rank: int, option: str) -> None:
    rng = np.random.default_rng(rank)
    hq, hkv = (3, 3) if rank == 3 else (1, 1)
    q4, k4, v4 = random_qkv(1, hq, hkv, 9, 11, 16, 8, seed=rng)
    opts = OPTIONS[option]((1, hq, 9, 11), rng)
    if "mask" in opts:  # a mask right-aligned to the lower rank
        m = opts["mask"]
        opts["mask"] = m.reshape(m.shape[max(m.ndim - rank, 0) :])
    drop = 4 - rank
    q, k, v = (a.reshape(a.shape[drop:]) for a in (q4, k4, v4))
    result = service.attention(q, k, v, return_weights=True, **opts)
    assert result.output.shape == q.shape[:-1] + (8,)
    assert result.weights.shape == q.shape[:-1] + (11,)
    assert result.lse.shape == q.shape[:-1]
    ref = reference_attention(q4, k4, v4, **opts)
    np.testing.assert_allclose(
        result.output, ref.output.numpy().reshape(result.output.shape), atol=ATOL
    )
    np.testing.assert_allclose(
        result.weights, ref.weights.numpy().reshape(result.weights.shape), atol=WEIGHT_ATOL
    )


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str
)
@pytest.mark.parametrize("rank", [2, 3, 4])
def test_torch_in_torch_out(dtype: torch.dtype, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    shape = (2, 4, 10, 32)[4 - rank :]
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    # float32 products for every dtype here (bfloat16's bf16 mode: tests/core/test_half.py).
    result = service.attention(q, k, v, causal=True, return_weights=True, precision="fp32")
    assert isinstance(result.output, torch.Tensor) and result.output.dtype == torch.float32
    assert isinstance(result.weights, torch.Tensor) and isinstance(result.lse, torch.Tensor)
    assert result.output.shape == shape and result.lse.shape == shape[:-1]
    # The reference sees exactly the values we were given (already rounded to `dtype`).
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(result.output.double(), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_numpy_dtypes(dtype: type) -> None:
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(1, 2, 2, 17, 17, 16, 16, seed=rng, dtype=dtype)
    result = service.attention(q, k, v, causal="bottom_right")
    assert isinstance(result.output, np.ndarray) and result.output.dtype == np.float32
    assert_matches(result, q, k, v, causal="bottom_right")


def test_non_contiguous_inputs() -> None:
    rng = np.random.default_rng(4)
    base = rng.standard_normal((2, 16, 3, 9)).astype(np.float32)
    q = base.transpose(0, 2, 1, 3)  # (2, 3, 16, 9), not contiguous
    k = base[:, ::2].transpose(0, 2, 1, 3)
    v = base[:, 1::2, :, ::-1].transpose(0, 2, 1, 3)
    mask = rng.random((12, 8)) < 0.8
    mask = mask[::-1, ::-1][:8, :8].T  # negative and transposed strides
    result = service.attention(q[:, :, :8], k, v, mask=mask, return_weights=True)
    assert_matches(result, q[:, :, :8], k, v, mask=mask)
    tq = torch.from_numpy(base).transpose(1, 2)
    tresult = service.attention(tq, tq, tq)
    expected = F.scaled_dot_product_attention(
        *(torch.from_numpy(base).double().transpose(1, 2),) * 3
    )
    torch.testing.assert_close(tresult.output.double(), expected, atol=ATOL, rtol=0)


def test_torch_requires_grad_and_bool_mask_tensor() -> None:
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 2, 6, 16, generator=gen, requires_grad=True)
    mask = torch.rand(6, 6, generator=gen) < 0.8
    mask[:, 0] = True
    result = service.attention(q, q, q, mask=mask)
    expected = F.scaled_dot_product_attention(*(q.detach().double(),) * 3, attn_mask=mask)
    torch.testing.assert_close(result.output.double(), expected, atol=ATOL, rtol=0)


def test_options_object_with_overrides() -> None:
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16, 16, seed=rng)
    opts = service.AttentionOptions(causal=True, softcap=2.0)
    overridden = service.attention(q, k, v, opts, causal=False)
    assert_matches(overridden, q, k, v, softcap=2.0)
    kept = service.attention(q, k, v, opts)
    assert_matches(kept, q, k, v, softcap=2.0, causal=True)


def test_array_valued_list_options() -> None:
    rng = np.random.default_rng(7)
    q, k, v = random_qkv(2, 2, 2, 8, 8, 16, 16, seed=rng)
    result = service.attention(
        q,
        k,
        v,
        key_lengths=np.array([3, 8]),
        global_tokens=torch.tensor([2]),
        window={"left": 1, "right": 0},
        alibi_slopes=np.array([0.1, 0.2]),
    )
    assert_matches(
        result,
        q,
        k,
        v,
        key_lengths=[3, 8],
        global_tokens=[2],
        window={"left": 1, "right": 0},
        alibi_slopes=[0.1, 0.2],
    )


def test_num_threads_gives_same_result() -> None:
    rng = np.random.default_rng(8)
    q, k, v = random_qkv(2, 4, 4, 70, 70, 32, 32, seed=rng)
    one = service.attention(q, k, v, causal=True, num_threads=1)
    two = service.attention(q, k, v, causal=True, num_threads=2)
    np.testing.assert_allclose(one.output, two.output, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# torch SDPA itself, where it defines the same thing


SDPA_CASES = {
    "plain": ({}, {}),
    "causal": ({"causal": True}, {"is_causal": True}),
    "scale": ({"scale": 0.7}, {"scale": 0.7}),
    "bool_mask": ("bool", None),
    "float_mask": ("float", None),
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
@pytest.mark.parametrize(
    "dims", [(2, 4, 4, 9, 9, 16), (1, 4, 2, 7, 19, 64), (2, 6, 3, 20, 5, 80), (1, 2, 1, 1, 1, 128)]
)
def test_matches_torch_sdpa(case: str, dims: tuple[int, ...]) -> None:
    b, hq, hkv, lq, lk, d = dims
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    q = torch.randn(b, hq, lq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, d, generator=gen, dtype=torch.float64)
    ours, theirs = SDPA_CASES[case]
    if ours == "bool":
        mask = (
            torch.rand(b, 1, lq, lk, generator=gen) < 0.7
        )  # torch 2.13 also gives 0 on empty rows
        ours, theirs = {"mask": mask}, {"attn_mask": mask}
    elif ours == "float":
        mask = torch.randn(lq, lk, generator=gen, dtype=torch.float64)
        ours, theirs = {"mask": mask}, {"attn_mask": mask}
    expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv, **theirs)
    result = service.attention(q, k, v, **ours)
    torch.testing.assert_close(result.output.double(), expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input: every problem is an InputError naming the argument


def _qkv(b: int = 2, hq: int = 4, hkv: int = 2, lq: int = 5, lk: int = 6, d: int = 8) -> dict:
    rng = np.random.default_rng(0)
    return {
        "q": rng.standard_normal((b, hq, lq, d)).astype(np.float32),
        "k": rng.standard_normal((b, hkv, lk, d)).astype(np.float32),
        "v": rng.standard_normal((b, hkv, lk, d)).astype(np.float32),
    }


def _with(**changes: Any) -> dict:
    args = _qkv()
    args.update(changes)
    return args


def _nan(a: np.ndarray, value: float = np.nan) -> np.ndarray:
    a = a.copy()
    a.flat[3] = value
    return a


BASE = _qkv()
BAD_INPUTS: dict[str, tuple[dict, dict, tuple]] = {
    "q rank 1": (_with(q=np.ones(8, np.float32)), {}, ("q",)),
    "q rank 5": (_with(q=np.ones((1, 1, 1, 1, 8), np.float32)), {}, ("q",)),
    "k rank differs": (_with(k=BASE["k"][0]), {}, ("k",)),
    "v rank differs": (_with(v=BASE["v"][0]), {}, ("v",)),
    "head dim mismatch": (_with(k=np.ones((2, 2, 6, 4), np.float32)), {}, ("k",)),
    "batch mismatch": (_with(k=BASE["k"][:1]), {}, ("k",)),
    "v batch mismatch": (_with(v=BASE["v"][:1]), {}, ("v",)),
    "v heads mismatch": (_with(v=BASE["v"][:, :1]), {}, ("v",)),
    "v length mismatch": (_with(v=BASE["v"][:, :, :5]), {}, ("v",)),
    "heads not multiple": (
        _with(k=BASE["k"][:, :1].repeat(3, 1), v=BASE["v"][:, :1].repeat(3, 1)),
        {},
        ("k",),
    ),
    "D = 0": (
        _with(q=np.ones((2, 4, 5, 0), np.float32), k=np.ones((2, 2, 6, 0), np.float32)),
        {},
        ("q",),
    ),
    "Dv = 0": (_with(v=np.ones((2, 2, 6, 0), np.float32)), {}, ("v",)),
    "NaN in q": (_with(q=_nan(BASE["q"])), {}, ("q",)),
    "Inf in k": (_with(k=_nan(BASE["k"], np.inf)), {}, ("k",)),
    "-Inf in v": (_with(v=_nan(BASE["v"], -np.inf)), {}, ("v",)),
    "float64 overflow in q": (_with(q=_nan(BASE["q"].astype(np.float64), 1e300)), {}, ("q",)),
    "int q": (_with(q=BASE["q"].astype(np.int32)), {}, ("q",)),
    "complex k": (_with(k=BASE["k"].astype(np.complex64)), {}, ("k",)),
    "bool v": (_with(v=BASE["v"] > 0), {}, ("v",)),
    "object q": (_with(q=np.array([[1.0, "x"]], dtype=object)), {}, ("q",)),
    "string q": (_with(q="hello"), {}, ("q",)),
    "torch int q": (_with(q=torch.ones(2, 4, 5, 8, dtype=torch.int64)), {}, ("q",)),
    "torch complex v": (_with(v=torch.ones(2, 2, 6, 8, dtype=torch.complex64)), {}, ("v",)),
    "torch sparse q": (_with(q=torch.ones(2, 4, 5, 8).to_sparse()), {}, ("q",)),
    "mask bad shape": (_qkv(), {"mask": np.ones((5, 7), bool)}, ("mask",)),
    "mask too many dims": (_qkv(), {"mask": np.ones((1, 2, 4, 5, 6), bool)}, ("mask",)),
    "mask int": (_qkv(), {"mask": np.ones((5, 6), np.int64)}, ("mask",)),
    "mask complex": (_qkv(), {"mask": np.ones((5, 6), np.complex64)}, ("mask",)),
    "mask NaN": (_qkv(), {"mask": np.full((5, 6), np.nan)}, ("mask",)),
    "mask +inf": (_qkv(), {"mask": np.full((5, 6), np.inf)}, ("mask",)),
    "mask huge": (_qkv(), {"mask": np.full((5, 6), 1e38, np.float32)}, ("mask",)),
    "scores overflow": (_with(q=BASE["q"] * 1e20, k=BASE["k"] * 1e20), {}, ("q",)),
    "scale overflow": (_qkv(), {"scale": 1e39}, ("scale",)),
    "softcap overflow": (_qkv(), {"softcap": 1e300}, ("softcap",)),
    "alibi overflow": (_qkv(), {"alibi_slopes": [0.5, 0.5, 1e38, 0.5]}, ("alibi_slopes", 2)),
    "mask not a tensor": (_qkv(), {"mask": "yes"}, ("mask",)),
    "key_lengths wrong count": (_qkv(), {"key_lengths": [6]}, ("key_lengths",)),
    "key_lengths too long": (_qkv(), {"key_lengths": [6, 7]}, ("key_lengths", 1)),
    "key_lengths negative": (_qkv(), {"key_lengths": [6, -1]}, ("key_lengths",)),
    "key_lengths not ints": (_qkv(), {"key_lengths": ["a", 1]}, ("key_lengths", 0)),
    "window negative": (_qkv(), {"window": {"left": -1}}, ("window", "left")),
    "window dilation 0": (_qkv(), {"window": {"dilation": 0}}, ("window", "dilation")),
    "window unknown field": (_qkv(), {"window": {"size": 3}}, ("window", "size")),
    "global_tokens outside": (_qkv(), {"global_tokens": [1, 6]}, ("global_tokens",)),
    "global_tokens negative": (_qkv(), {"global_tokens": [-1]}, ("global_tokens",)),
    "alibi wrong count": (_qkv(), {"alibi_slopes": [0.1, 0.2]}, ("alibi_slopes",)),
    "alibi NaN": (_qkv(), {"alibi_slopes": [float("nan")] * 4}, ("alibi_slopes",)),
    "softcap zero": (_qkv(), {"softcap": 0.0}, ("softcap",)),
    "scale inf": (_qkv(), {"scale": float("inf")}, ("scale",)),
    "scale text": (_qkv(), {"scale": "big"}, ("scale",)),
    "causal unknown": (_qkv(), {"causal": "sideways"}, ("causal",)),
    "mask_convention unknown": (_qkv(), {"mask_convention": "maybe"}, ("mask_convention",)),
    "empty_rows unknown": (_qkv(), {"empty_rows": "drop"}, ("empty_rows",)),
    "unknown option": (_qkv(), {"dropout": 0.1}, ("dropout",)),
    "num_threads zero": (_qkv(), {"num_threads": 0}, ("num_threads",)),
    "num_threads text": (_qkv(), {"num_threads": "2"}, ("num_threads",)),
    "options wrong type": (_qkv(), {"options": 3}, ("options",)),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_argument(case: str) -> None:
    args, kwargs, loc = BAD_INPUTS[case]
    with pytest.raises(InputError) as info:
        service.attention(**args, **kwargs)
    assert info.value.loc == loc, info.value
    assert str(info.value).startswith(".".join(map(str, loc)) + ": ")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_found_anywhere_in_a_large_input(dtype: type, bad: float) -> None:
    """The finiteness check reads the input block by block: a bad value in the last block of a
    multi-block array is refused, naming the tensor."""
    q = np.ones((3, 300_000 // 64 * 3, 64), dtype=dtype)  # about 2.7 blocks of 2^18 values
    k = q[:, :8].copy()
    q.reshape(-1)[-1] = bad
    with pytest.raises(service.InputError) as info:
        service.attention(q, k, k)
    assert info.value.loc == ("q",) and "NaN or Inf" in str(info.value)


def test_value_range_check_sees_the_largest_value_in_any_block() -> None:
    """A value that makes scale * q.k overflow float32, in the last block only: refused."""
    q = np.ones((3, 300_000 // 64 * 3, 64), dtype=np.float32)
    q.reshape(-1)[-1] = 3e38
    with pytest.raises(service.InputError) as info:
        service.attention(q, q[:, :8].copy(), q[:, :8].copy())
    assert info.value.loc == ("q",) and "too large" in str(info.value)
