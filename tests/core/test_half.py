"""float16 and bfloat16 through the Python API: they reach the kernel as they are (no float32
copy), the options precision and out_dtype, and the accuracy bf16 rounding allows.

The bound for precision "bf16" (tests/native/test_precision.py derives it): against float64
attention on the same bf16 values, |error| <= u * sum_j p_ij |v_jd| + 2e-5 max|v|, u = 2^-8.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import service
from service import _native
from service.core.errors import InputError

U_BF16 = 2.0**-8
BF16_CPU = "avx512bf16" in _native.available_isas()


def torch_qkv(dtype: torch.dtype, seed: int = 0, shape=(2, 4, 33, 16)) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=gen).to(dtype) for _ in range(3))


def bf16_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    q, k, v = (x.double() for x in (q, k, v))
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return U_BF16 * (s.softmax(-1) @ v.abs()) + 2e-5 * v.abs().max()


@pytest.fixture
def kernel_inputs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[np.dtype, ...]]:
    """The dtypes of q, k, v each call hands to the kernel."""
    seen: list[tuple[np.dtype, ...]] = []
    real = _native.attention

    def spy(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> Any:
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    monkeypatch.setattr(_native, "attention", spy)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_torch_half_tensors_reach_the_kernel_as_they_are(
    dtype: torch.dtype, causal: bool, kernel_inputs: list[tuple[np.dtype, ...]]
) -> None:
    q, k, v = torch_qkv(dtype)
    res = service.attention(q, k, v, causal=causal)
    want = np.dtype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else np.dtype(np.float16)
    assert kernel_inputs == [(want, want, want)]
    assert isinstance(res.output, torch.Tensor) and res.output.dtype == torch.float32
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    err = (res.output.double() - expected).abs()
    # bfloat16 runs with bf16 products where the CPU has them; float16 keeps float32 products.
    assert (err <= bf16_bound(q, k, v, causal)).all()
    if dtype == torch.float16 or not BF16_CPU:
        assert err.max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_out_dtype_input_answers_in_the_inputs_dtype(dtype: torch.dtype) -> None:
    q, k, v = torch_qkv(dtype, seed=1)
    wide = service.attention(q, k, v, return_weights=True)
    same = service.attention(q, k, v, return_weights=True, out_dtype="input")
    assert same.output.dtype == dtype
    torch.testing.assert_close(same.output, wide.output.to(dtype), rtol=0, atol=0)
    assert same.weights.dtype == torch.float32 and same.lse.dtype == torch.float32


def test_ml_dtypes_bfloat16_arrays_in_and_out(kernel_inputs: list[tuple[np.dtype, ...]]) -> None:
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((3, 20, 8)).astype(ml_dtypes.bfloat16) for _ in range(3))
    res = service.attention(q, k, v, out_dtype="input", precision="fp32")
    assert kernel_inputs[0][0] == np.dtype(ml_dtypes.bfloat16)
    assert res.output.dtype == np.dtype(ml_dtypes.bfloat16) and res.output.shape == (3, 20, 8)
    qt, kt, vt = (torch.from_numpy(x.astype(np.float64)) for x in (q, k, v))
    expected = F.scaled_dot_product_attention(qt, kt, vt).numpy()
    # One rounding of the float32 result to bfloat16: half an ulp of 8 significant bits.
    np.testing.assert_allclose(res.output.astype(np.float64), expected, rtol=2**-8, atol=1e-6)


def test_precision_bf16_on_float32_inputs_rounds_them() -> None:
    q, k, v = (x.float() for x in torch_qkv(torch.float32, seed=3))
    fast = service.attention(q, k, v, precision="bf16").output
    rounded = [x.bfloat16() for x in (q, k, v)]
    expected = F.scaled_dot_product_attention(*(x.double() for x in rounded))
    assert ((fast.double() - expected).abs() <= bf16_bound(*rounded, causal=False)).all()


def test_mixed_dtypes_compute_in_float32(kernel_inputs: list[tuple[np.dtype, ...]]) -> None:
    q, k, v = torch_qkv(torch.bfloat16, seed=4)
    res = service.attention(q, k.float(), v.half(), out_dtype="input")
    assert kernel_inputs == [(np.dtype(np.float32),) * 3]
    assert res.output.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_non_finite_half_inputs_are_refused_by_name(dtype: torch.dtype) -> None:
    q, k, v = torch_qkv(dtype, seed=5)
    v[0, 1, 2, 3] = float("inf")
    with pytest.raises(InputError) as info:
        service.attention(q, k, v)
    assert info.value.loc == ("v",) and "NaN or Inf" in str(info.value)


def test_the_approximations_refuse_the_half_options() -> None:
    q, k, v = torch_qkv(torch.bfloat16, seed=6)
    for option in ({"out_dtype": "input"}, {"precision": "bf16"}):
        with pytest.raises(InputError, match="method 'linear' does not support"):
            service.attention(q, k, v, method="linear", **option)
    # The approximations compute in float32 from the same values.
    assert service.attention(q, k, v, method="linear").output.dtype == torch.float32


@pytest.mark.parametrize("out_dtype", ["float32", "input"])
def test_bfloat16_values_near_the_float32_limit_keep_their_dtype_and_answer(out_dtype: str) -> None:
    """max|v| * Lk beyond float32's range: v is scaled by a power of two in bfloat16 itself (the
    kernel takes q, k, v of one dtype) and the output scaled back, within bf16's bound of the
    float64 answer."""
    q, k, v = torch_qkv(torch.bfloat16, seed=3, shape=(1, 2, 40, 16))
    v = (v * 2.0**126).to(torch.bfloat16)  # max|v| about 3e38, 40 keys
    res = service.attention(q, k, v, out_dtype=out_dtype)
    assert res.output.dtype == (torch.bfloat16 if out_dtype == "input" else torch.float32)
    got = res.output.double()
    assert torch.isfinite(got).all()
    s = q.double() @ k.double().transpose(-1, -2) / 4.0
    want = s.softmax(-1) @ v.double()
    bound = bf16_bound(q, k, v, causal=False) + (U_BF16 * want.abs() if out_dtype == "input" else 0)
    assert ((got - want).abs() <= bound).all()
