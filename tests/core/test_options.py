"""The options model (service/options.py) and how the Python API reports its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import service
from service import (
    AttentionOptions,
    InputError,
    MaskingOptions,
    MultiheadOptions,
    MultiheadWeights,
    Window,
)


def test_defaults() -> None:
    opts = AttentionOptions()
    assert opts.scale is None and opts.causal is False and opts.causal_mode is None
    assert opts.mask is None and opts.mask_convention == "attend" and opts.empty_rows == "zero"
    assert opts.return_weights is False and opts.window is None and opts.softcap is None


@pytest.mark.parametrize(
    ("causal", "mode"),
    [(False, None), (True, "top_left"), ("top_left", "top_left"), ("bottom_right", "bottom_right")],
)
def test_causal_mode(causal: bool | str, mode: str | None) -> None:
    assert AttentionOptions(causal=causal).causal_mode == mode


def test_global_tokens_sorted_unique() -> None:
    assert MaskingOptions(global_tokens=[5, 1, 5, 0]).global_tokens == [0, 1, 5]


def test_window_from_dict_and_bounds() -> None:
    opts = AttentionOptions(window={"left": 3, "dilation": 2})
    assert opts.window == Window(left=3, right=None, dilation=2)
    with pytest.raises(ValidationError):
        Window(left=-1)
    with pytest.raises(ValidationError):
        Window(dilation=0)


@pytest.mark.parametrize(
    "mask",
    [
        [[True, False], [True, True]],
        np.array([[True, False], [True, True]]),
        torch.tensor([[True, False], [True, True]]),
        {"dtype": "bool", "shape": [2, 2], "data": [True, False, True, True]},
    ],
    ids=["list", "numpy", "torch", "object"],
)
def test_mask_forms_decode_to_numpy(mask: object) -> None:
    opts = AttentionOptions(mask=mask)
    assert isinstance(opts.mask, np.ndarray) and opts.mask.dtype == bool
    np.testing.assert_array_equal(opts.mask, [[True, False], [True, True]])


def test_multihead_options() -> None:
    w = service.init_multihead_weights(8, 2)
    opts = MultiheadOptions(num_heads=2, weights=w.model_dump(), causal="bottom_right")
    assert opts.num_kv_heads is None and opts.seed == 0 and opts.average_weights is True
    assert opts.need_weights is False and isinstance(opts.weights, MultiheadWeights)
    np.testing.assert_array_equal(opts.weights.q_proj, w.q_proj)
    assert opts.weights.q_bias.shape == (8,)
    for bad in (
        {"num_heads": 0},
        {"num_heads": 2, "num_kv_heads": 0},
        {"num_heads": 2, "seed": -1},
    ):
        with pytest.raises(ValidationError):
            MultiheadOptions(**bad)
    with pytest.raises(ValidationError):
        MultiheadOptions()  # num_heads is required


def test_multihead_weights_biases_optional_and_extra_forbidden() -> None:
    m = np.eye(4, dtype=np.float32)
    w = MultiheadWeights(q_proj=m, k_proj=m, v_proj=m, out_proj=m)
    assert w.q_bias is None and w.out_bias is None
    with pytest.raises(ValidationError):
        MultiheadWeights(q_proj=m, k_proj=m, v_proj=m, out_proj=m, gate=m)


X = np.ones((1, 2, 3, 4), np.float32)


@pytest.mark.parametrize(
    ("kwargs", "loc", "words"),
    [
        ({"causal": "sideways"}, ("causal",), "top_left"),
        ({"window": {"left": -2}}, ("window", "left"), "greater than or equal to 0"),
        ({"window": {"right": "x"}}, ("window", "right"), "integer"),
        ({"window": {"size": 3}}, ("window", "size"), "not permitted"),
        ({"alibi_slopes": ["a"]}, ("alibi_slopes", 0), "number"),
        ({"key_lengths": [1.5]}, ("key_lengths", 0), "integer"),
        ({"softcap": -1.0}, ("softcap",), "greater than 0"),
        ({"scale": float("nan")}, ("scale",), "finite"),
        ({"mask": {"dtype": "int8", "shape": [1], "data": [1]}}, ("mask",), "dtype"),
        ({"nonsense": 1}, ("nonsense",), "not permitted"),
    ],
)
def test_validation_errors_become_input_errors(kwargs: dict, loc: tuple, words: str) -> None:
    with pytest.raises(InputError) as info:
        service.attention(X, X, X, **kwargs)
    assert info.value.loc == loc
    assert words in info.value.msg


def test_options_and_kwargs_merge() -> None:
    """kwargs override `options`; fields only set in `options` survive the merge."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 1, 6, 8)).astype(np.float32)
    base = AttentionOptions(causal=True, window={"left": 1}, return_weights=True)
    merged = service.attention(q, q, q, base, window=None)
    only_causal = service.attention(q, q, q, causal=True, return_weights=True)
    np.testing.assert_array_equal(merged.weights, only_causal.weights)
    # A bad override is reported even when `options` itself was valid.
    with pytest.raises(InputError) as info:
        service.attention(q, q, q, base, softcap=0)
    assert info.value.loc == ("softcap",)
    # A plain dict works as options too.
    as_dict = service.attention(q, q, q, {"causal": True, "return_weights": True})
    np.testing.assert_array_equal(as_dict.weights, only_causal.weights)
