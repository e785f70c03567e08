"""service.multihead_attention against torch.nn.MultiheadAttention and plain float64 math."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import service
from service import InputError, MultiheadWeights, init_multihead_weights
from tests.support.reference import reference_multihead, torch_mha

ATOL = 1e-4


def weights_with_biases(*dims: int | None, seed: int = 0, bias: bool = True) -> MultiheadWeights:
    """Xavier weights (init_multihead_weights of `dims`: embed_dim, num_heads, num_kv_heads,
    kdim, vdim) plus random (non-zero) biases, so that bias handling is really tested."""
    w = init_multihead_weights(*dims, seed=seed)
    rng = np.random.default_rng(seed + 100)
    fields = {name: getattr(w, name) for name in ("q_proj", "k_proj", "v_proj", "out_proj")}
    if bias:
        for name in ("q_bias", "k_bias", "v_bias", "out_bias"):
            fields[name] = rng.uniform(-0.5, 0.5, getattr(w, name).shape).astype(np.float32)
    return MultiheadWeights(**fields)


# (name, B, Lq, Lk, E, H, kdim, vdim, bias, self-attention)
CONFIGS = [
    ("self", 2, 7, 7, 16, 4, 16, 16, True, True),
    ("cross_kdim_vdim", 2, 5, 9, 32, 4, 12, 20, True, False),
    ("self_long_no_bias", 1, 65, 65, 64, 2, 64, 64, False, True),
    ("cross_same_dims", 2, 3, 130, 64, 8, 64, 64, True, False),
    ("unbatched_self", 0, 5, 5, 16, 2, 16, 16, True, True),
]
MASKINGS = ["none", "key_padding", "attn_mask_2d", "attn_mask_3d", "float_attn_mask", "causal"]


def _inputs(cfg: tuple, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, b, lq, lk, e, _, kdim, vdim, _, self_attn = cfg
    lead = (b,) if b else ()
    x = rng.standard_normal((*lead, lq, e)).astype(np.float32)
    if self_attn:
        return x, x, x
    key = rng.standard_normal((*lead, lk, kdim)).astype(np.float32)
    value = rng.standard_normal((*lead, lk, vdim)).astype(np.float32)
    return x, key, value


def _masking(kind: str, b: int, h: int, lq: int, lk: int, rng: np.random.Generator):
    """(our options, torch's forward kwargs) for one way of masking; no row is left empty."""
    bb = max(b, 1)
    if kind == "none":
        return {}, {}
    if kind == "key_padding":
        lengths = rng.integers(1, lk + 1, size=bb)
        pad = np.arange(lk) >= lengths[:, None]  # torch: True = padding
        return {"key_lengths": lengths.tolist()}, {
            "key_padding_mask": torch.from_numpy(pad if b else pad[0])
        }
    if kind == "attn_mask_2d":
        masked = rng.random((lq, lk)) < 0.3
        masked[:, 0] = False
        return {"mask": masked, "mask_convention": "ignore"}, {
            "attn_mask": torch.from_numpy(masked)
        }
    if kind == "attn_mask_3d":  # torch's (B*H, Lq, Lk) is our (B, H, Lq, Lk)
        masked = rng.random((bb * h, lq, lk)) < 0.3
        masked[..., -1] = False
        ours = masked.reshape(bb, h, lq, lk) if b else masked
        return {"mask": ours, "mask_convention": "ignore"}, {"attn_mask": torch.from_numpy(masked)}
    if kind == "float_attn_mask":
        m = rng.normal(0, 1, (lq, lk))
        return {"mask": m}, {"attn_mask": torch.from_numpy(m)}
    if kind == "causal":  # top-left, torch spells it as a mask
        masked = np.triu(np.ones((lq, lk), dtype=bool), k=1)
        return {"causal": True}, {"attn_mask": torch.from_numpy(masked)}
    raise AssertionError(kind)


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c[0])
def test_matches_torch_multihead_attention(cfg: tuple, masking: str) -> None:
    name, b, lq, lk, e, h, kdim, vdim, bias, _ = cfg
    rng = np.random.default_rng([len(name), MASKINGS.index(masking)])
    query, key, value = _inputs(cfg, rng)
    w = weights_with_biases(e, h, None, kdim, vdim, seed=lq, bias=bias)
    ours_opts, torch_opts = _masking(masking, b, h, lq, lk, rng)
    mha = torch_mha(w, e, h, kdim, vdim)
    tq, tk, tv = (torch.from_numpy(a).double() for a in (query, key, value))
    for average in (True, False):
        result = service.multihead_attention(
            query,
            key,
            value,
            num_heads=h,
            weights=w,
            need_weights=True,
            average_weights=average,
            **ours_opts,
        )
        with torch.no_grad():
            out, weights = mha(
                tq, tk, tv, need_weights=True, average_attn_weights=average, **torch_opts
            )
        np.testing.assert_allclose(result.output, out.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(result.weights, weights.numpy(), atol=1e-5, rtol=0)
    assert result.param_count == sum(p.numel() for p in mha.parameters())
    plain = service.multihead_attention(query, key, value, num_heads=h, weights=w, **ours_opts)
    assert plain.weights is None and plain.lse is None
    np.testing.assert_allclose(plain.output, result.output, atol=1e-6, rtol=0)


def test_key_padding_as_bool_mask() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 16)).astype(np.float32)
    pad = np.arange(6) >= np.array([2, 6, 4])[:, None]
    w = weights_with_biases(16, 2)
    ours = service.multihead_attention(
        x, num_heads=2, weights=w, mask=pad[:, None, None, :], mask_convention="ignore"
    )
    with torch.no_grad():
        t = torch.from_numpy(x).double()
        expected, _ = torch_mha(w, 16, 2, 16, 16)(t, t, t, key_padding_mask=torch.from_numpy(pad))
    np.testing.assert_allclose(ours.output, expected.numpy(), atol=ATOL, rtol=0)


def test_empty_rows_like_torch() -> None:
    """A fully padded batch item: torch's MultiheadAttention gives NaN, empty_rows="nan" too."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)
    w = weights_with_biases(16, 4)
    pad = np.zeros((2, 4), dtype=bool)
    pad[1] = True
    with torch.no_grad():
        t = torch.from_numpy(x).double()
        out, weights = torch_mha(w, 16, 4, 16, 16)(t, t, t, key_padding_mask=torch.from_numpy(pad))
    nan = service.multihead_attention(
        x, num_heads=4, weights=w, key_lengths=[4, 0], need_weights=True, empty_rows="nan"
    )
    np.testing.assert_array_equal(np.isnan(nan.output), np.isnan(out.numpy()))
    np.testing.assert_array_equal(np.isnan(nan.weights), np.isnan(weights.numpy()))
    np.testing.assert_allclose(nan.output[0], out.numpy()[0], atol=ATOL)
    zero = service.multihead_attention(x, num_heads=4, weights=w, key_lengths=[4, 0])
    # Attention gives 0 on the empty rows, so only out_proj's bias is left.
    np.testing.assert_allclose(zero.output[1], np.broadcast_to(w.out_bias, (4, 16)), atol=1e-6)


GQA_OPTIONS = {
    "plain": {},
    "causal_bottom_right": {"causal": "bottom_right"},
    "window_global_alibi": {
        "window": {"left": 2, "right": 1, "dilation": 2},
        "global_tokens": [0],
        "alibi_slopes": True,
    },
    "lengths_softcap_scale": {"key_lengths": [3, 11], "softcap": 2.0, "scale": 0.2},
}


@pytest.mark.parametrize("option", list(GQA_OPTIONS))
@pytest.mark.parametrize("heads", [(8, 2), (4, 1), (6, 3)])
def test_grouped_query_heads(heads: tuple[int, int], option: str) -> None:
    h, hkv = heads
    e, kdim, vdim = 8 * h, 10, 14
    rng = np.random.default_rng([h, hkv, len(option)])
    x = rng.standard_normal((2, 9, e)).astype(np.float32)
    key = rng.standard_normal((2, 11, kdim)).astype(np.float32)
    value = rng.standard_normal((2, 11, vdim)).astype(np.float32)
    w = weights_with_biases(e, h, hkv, kdim, vdim, seed=h)
    assert w.k_proj.shape == (hkv * 8, kdim)
    opts = GQA_OPTIONS[option]
    result = service.multihead_attention(
        x,
        key,
        value,
        num_heads=h,
        num_kv_heads=hkv,
        weights=w,
        need_weights=True,
        average_weights=False,
        **opts,
    )
    out, weights, lse = reference_multihead(x, key, value, w, h, hkv, **opts)
    np.testing.assert_allclose(result.output, out.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(result.weights, weights.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.lse, lse.numpy(), atol=ATOL, rtol=1e-6)
    kv = hkv * 8
    assert result.param_count == 2 * e * e + kv * (kdim + vdim) + 2 * e + 2 * kv
    hd = e // h
    assert (
        result.flops
        == 2 * 2 * 9 * e * e * 2 + 2 * 2 * 11 * kv * (kdim + vdim) + 4 * 2 * h * 9 * 11 * hd
    )


def test_default_weights_are_xavier_from_seed() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    first = service.multihead_attention(x, num_heads=4, seed=7)
    again = service.multihead_attention(x, num_heads=4, seed=7)
    other = service.multihead_attention(x, num_heads=4, seed=8)
    np.testing.assert_array_equal(first.output, again.output)
    assert not np.allclose(first.output, other.output)
    expected = init_multihead_weights(16, 4, seed=7)
    for name in MultiheadWeights.model_fields:
        np.testing.assert_array_equal(getattr(first.weights_used, name), getattr(expected, name))
    # The reported weights reproduce the result through torch.
    with torch.no_grad():
        t = torch.from_numpy(x).double()
        out, _ = torch_mha(first.weights_used, 16, 4, 16, 16)(t, t, t)
    np.testing.assert_allclose(first.output, out.numpy(), atol=ATOL, rtol=0)
    assert first.param_count == 4 * 16 * 16 + 4 * 16  # torch's count with bias=True


def test_xavier_init() -> None:
    a = init_multihead_weights(64, 8, 2, kdim=32, vdim=48, seed=1)
    b = init_multihead_weights(64, 8, 2, kdim=32, vdim=48, seed=1)
    c = init_multihead_weights(64, 8, 2, kdim=32, vdim=48, seed=2)
    shapes = {"q_proj": (64, 64), "k_proj": (16, 32), "v_proj": (16, 48), "out_proj": (64, 64)}
    for name, shape in shapes.items():
        wa, wb, wc = getattr(a, name), getattr(b, name), getattr(c, name)
        assert wa.shape == shape and wa.dtype == np.float32
        np.testing.assert_array_equal(wa, wb)
        assert not np.array_equal(wa, wc)
        bound = math.sqrt(6 / sum(shape))
        assert np.abs(wa).max() <= bound
        assert np.abs(wa).max() > 0.9 * bound  # uniform over the whole range
        assert abs(wa.std() - bound / math.sqrt(3)) < 0.15 * bound
    for name, size in (("q_bias", 64), ("k_bias", 16), ("v_bias", 16), ("out_bias", 64)):
        bias = getattr(a, name)
        assert bias.shape == (size,) and not bias.any()


def test_torch_in_torch_out_and_dict_weights() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 16, generator=gen, dtype=torch.float64)
    w = weights_with_biases(16, 2)
    as_dict = {name: torch.from_numpy(getattr(w, name)) for name in MultiheadWeights.model_fields}
    result = service.multihead_attention(x, num_heads=2, weights=as_dict, need_weights=True)
    assert isinstance(result.output, torch.Tensor) and result.output.dtype == torch.float32
    assert isinstance(result.weights, torch.Tensor) and result.weights.shape == (2, 6, 6)
    assert result.lse.shape == (2, 2, 6)
    with torch.no_grad():
        expected, _ = torch_mha(w, 16, 2, 16, 16)(x, x, x)
    torch.testing.assert_close(result.output.double(), expected, atol=ATOL, rtol=0)


def test_value_defaults_to_key() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    mem = rng.standard_normal((1, 7, 8)).astype(np.float32)
    implicit = service.multihead_attention(x, mem, num_heads=2, seed=1)
    explicit = service.multihead_attention(x, mem, mem, num_heads=2, seed=1)
    np.testing.assert_array_equal(implicit.output, explicit.output)


def test_options_model_as_options() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 5, 8)).astype(np.float32)
    opts = service.MultiheadOptions(num_heads=2, causal=True, seed=3)
    via_model = service.multihead_attention(x, num_heads=2, options=opts, seed=3)
    via_kwargs = service.multihead_attention(x, num_heads=2, causal=True, seed=3)
    np.testing.assert_array_equal(via_model.output, via_kwargs.output)


# ---------------------------------------------------------------------------------------------
# Bad input


def _x(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return np.ones(shape, dtype=dtype)


W16 = init_multihead_weights(16, 4)
BAD: dict[str, tuple[tuple, dict, tuple]] = {
    "query rank 1": ((_x(16),), {}, ("query",)),
    "query rank 4": ((_x(1, 2, 3, 16),), {}, ("query",)),
    "key rank differs": ((_x(2, 3, 16), _x(3, 16)), {}, ("key",)),
    "value rank differs": ((_x(2, 3, 16), _x(2, 3, 16), _x(3, 16)), {}, ("value",)),
    "key batch differs": ((_x(2, 3, 16), _x(1, 3, 16)), {}, ("key",)),
    "value length differs": ((_x(2, 3, 16), _x(2, 3, 16), _x(2, 4, 16)), {}, ("value",)),
    "E = 0": ((_x(2, 3, 0),), {}, ("query",)),
    "kdim = 0": ((_x(2, 3, 16), _x(2, 3, 0)), {}, ("key",)),
    "E % H": ((_x(2, 3, 16),), {"num_heads": 3}, ("num_heads",)),
    "H % Hkv": ((_x(2, 3, 16),), {"num_kv_heads": 3}, ("num_kv_heads",)),
    "num_heads 0": ((_x(2, 3, 16),), {"num_heads": 0}, ("num_heads",)),
    "num_kv_heads 0": ((_x(2, 3, 16),), {"num_kv_heads": 0}, ("num_kv_heads",)),
    "query NaN": ((np.full((2, 3, 16), np.nan, np.float32),), {}, ("query",)),
    "key int": ((_x(2, 3, 16), _x(2, 3, 16, dtype=np.int64)), {}, ("key",)),
    "seed negative": ((_x(2, 3, 16),), {"seed": -1}, ("seed",)),
    "projection overflow": ((_x(2, 3, 16) * 1e36,), {}, ("query",)),
    "scores overflow": ((_x(2, 3, 16) * 1e19,), {"weights": W16}, ("query",)),
    "seed text, weights given": ((_x(2, 3, 16),), {"seed": "x", "weights": W16}, ("seed",)),
    "weights wrong type": ((_x(2, 3, 16),), {"weights": [1, 2]}, ("weights",)),
    "weights missing": (
        (_x(2, 3, 16),),
        {"weights": {"q_proj": W16.q_proj}},
        ("weights", "k_proj"),
    ),
    "weights extra": (
        (_x(2, 3, 16),),
        {"weights": {**W16.model_dump(), "gate": [1.0]}},
        ("weights", "gate"),
    ),
    "weights shape": (
        (_x(2, 3, 16), _x(2, 3, 8)),
        {"weights": W16},  # k_proj is (16, 16) but kdim is 8
        ("weights", "k_proj"),
    ),
    "weights NaN": (
        (_x(2, 3, 16),),
        {"weights": W16.model_copy(update={"out_bias": np.full(16, np.nan, np.float32)})},
        ("weights", "out_bias"),
    ),
    "weights int": (
        (_x(2, 3, 16),),
        {"weights": W16.model_copy(update={"q_proj": np.ones((16, 16), np.int32)})},
        ("weights", "q_proj"),
    ),
    "mask shape": ((_x(2, 3, 16),), {"mask": _x(2, 3, dtype=bool)}, ("mask",)),
    "key_lengths count": ((_x(2, 3, 16),), {"key_lengths": [1, 2, 3]}, ("key_lengths",)),
    "alibi count": ((_x(2, 3, 16),), {"alibi_slopes": [0.5]}, ("alibi_slopes",)),
    "unknown option": ((_x(2, 3, 16),), {"return_weights": True}, ("return_weights",)),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case: str) -> None:
    args, kwargs, loc = BAD[case]
    kwargs = {"num_heads": 4, **kwargs}
    with pytest.raises(InputError) as info:
        service.multihead_attention(*args, **kwargs)
    assert info.value.loc == loc, info.value
