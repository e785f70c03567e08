"""bfloat16 and float16 inputs, the bf16 compute mode and out_dtype, on every instruction set.

The numerics under test (native/kernels/elements.h):
- precision "fp32": 16-bit inputs are widened exactly and computed as float32 inputs are, so
  the results equal the float32 kernel's on the widened values bit for bit.
- precision "bf16": q, k, v are rounded to bf16 (round to nearest even; bfloat16 inputs are
  already), Q.K^T and P.V are sums of exact bf16 products in float32 (VDPBF16PS, or its
  emulation), the softmax statistics are float32 and P is rounded to bf16 as P.V's operand.
  Against float64 attention on the rounded inputs, each output element then errs by at most
      u * sum_j p_ij |v_jd| + float32 terms,   u = 2^-8 (bf16's unit roundoff, 8-bit significand)
  (the rounding of P; the float32 terms are the score and sum roundings and the 2^x polynomial,
  bounded here by 2e-5 * max|v|). The avx512 build emulates the instruction exactly, so where
  both run it must agree with avx512bf16 bit for bit; the other builds differ from it only in
  float32 rounding order.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from service import _native
from tests.native.test_kernels import reference
from tests.support.native import ISAS, isa_set

U_BF16 = 2.0**-8
ATOL_FP32 = 1e-4  # as test_kernels' float32 checks


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round to nearest even to bfloat16, as uint16 bit patterns (an independent numpy
    implementation, for finite inputs)."""
    b = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def bits_to_f32(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32)


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def qkv(seed: int, b: int = 2, hq: int = 4, hkv: int = 2, lq: int = 37, lk: int = 150, d: int = 24):
    rng = np.random.default_rng(seed)
    return rand(rng, b, hq, lq, d), rand(rng, b, hkv, lk, d), rand(rng, b, hkv, lk, d)


def as_dtype(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """x in `dtype` for the kernel, its exact float32 value, and the kernel's keywords."""
    if dtype == "bfloat16":  # bit patterns, as torch's bf16 tensors are handed over
        bits = bf16_bits(x)
        return bits, bits_to_f32(bits), {"bfloat16": True}
    if dtype == "ml_dtypes.bfloat16":
        y = x.astype(ml_dtypes.bfloat16)
        return y, y.astype(np.float32), {}
    y = x.astype(dtype)
    return y, y.astype(np.float32), {}


def bf16_bound(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> np.ndarray:
    """The error bound of precision bf16 on inputs that are already bf16 (see the top)."""
    _, _, w = reference(q, k, v, **kw)
    vt = torch.from_numpy(np.abs(v)).double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (U_BF16 * (w @ vt)).numpy() + 2e-5 * float(np.abs(v).max())


CASES = {
    "full": {},
    "causal": {"causal": 1},
    "bottom-right causal, key_lengths": {"causal": 2, "key_lengths": np.array([150, 61])},
    "window and globals": {"window_left": 9, "window_right": 4, "global_tokens": np.array([0, 77])},
    "dilated window": {"window_left": 6, "window_right": 6, "dilation": 3},
    "alibi and softcap": {
        "alibi_slopes": np.array([0.5, 0.25, 0.1, 0.05], np.float32),
        "softcap": 5.0,
    },
}


@pytest.mark.parametrize("dtype", ["bfloat16", "ml_dtypes.bfloat16", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_16_bit_inputs_in_fp32_equal_the_float32_kernel_on_their_values(
    isa: str, dtype: str, case: str
) -> None:
    q, k, v = qkv(1)
    kw = {"scale": 0.2, **CASES[case]}
    (q16, q32, flag), (k16, k32, _), (v16, v32, _) = (as_dtype(x, dtype) for x in (q, k, v))
    out, lse, w = _native.attention(
        q16, k16, v16, precision="fp32", return_weights=True, **flag, **kw
    )
    out32, lse32, w32 = _native.attention(q32, k32, v32, return_weights=True, **kw)
    np.testing.assert_array_equal(out, out32)
    np.testing.assert_array_equal(lse, lse32)
    np.testing.assert_array_equal(w, w32)
    ref_out, _, _ = reference(q32, k32, v32, **kw)
    np.testing.assert_allclose(out, ref_out.numpy(), rtol=0, atol=ATOL_FP32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_precision_is_within_the_bf16_bound(isa: str, dtype: str, case: str) -> None:
    q, k, v = qkv(2)
    kw = {"scale": 0.2, **CASES[case]}
    (qx, q32, flag), (kx, k32, _), (vx, v32, _) = (as_dtype(x, dtype) for x in (q, k, v))
    out, lse, w = _native.attention(qx, kx, vx, precision="bf16", return_weights=True, **flag, **kw)
    # The reference sees what the mode computes with: the inputs rounded to bf16.
    qb, kb, vb = (bits_to_f32(bf16_bits(x)) for x in (q32, k32, v32))
    ref_out, ref_lse, ref_w = reference(qb, kb, vb, **kw)
    err = np.abs(out - ref_out.numpy())
    bound = bf16_bound(qb, kb, vb, **kw)
    assert (err <= bound).all(), f"worst error / bound {float((err / bound).max()):.3f}"
    # The statistics stay float32: lse and the weights are as exact as the scores.
    finite = np.isfinite(ref_lse.numpy())
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], ref_lse.numpy()[finite], rtol=0, atol=ATOL_FP32)
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=0, atol=1e-5)
    assert (out[~finite] == 0).all()


def test_the_bound_is_not_vacuous() -> None:
    """The bf16 rounding of P shows in the results (so the bound above is what is tested), and
    the fp32 mode on the same inputs is far more accurate."""
    q, k, v = qkv(3)
    qb, kb, vb = (bf16_bits(x) for x in (q, k, v))
    ref_out = reference(*(bits_to_f32(x) for x in (qb, kb, vb)), scale=0.2)[0].numpy()
    fast, _, _ = _native.attention(qb, kb, vb, scale=0.2, bfloat16=True, precision="bf16")
    exact, _, _ = _native.attention(qb, kb, vb, scale=0.2, bfloat16=True, precision="fp32")
    assert np.abs(fast - ref_out).max() > 20 * np.abs(exact - ref_out).max()
    assert np.abs(fast - ref_out).max() > 1e-4


@pytest.mark.skipif(
    not {"avx512", "avx512bf16"} <= set(ISAS), reason="needs a CPU with AVX-512 and AVX512_BF16"
)
@pytest.mark.parametrize("case", list(CASES))
def test_the_emulation_equals_the_instruction_bit_for_bit(case: str) -> None:
    q, k, v = qkv(4, d=37)  # an odd head dim: padded pairs
    kw = {"scale": 0.2, **CASES[case]}
    qb, kb, vb = (bf16_bits(x) for x in (q, k, v))
    results = []
    for name in ("avx512", "avx512bf16"):
        with isa_set(name):
            results.append(
                _native.attention(
                    qb, kb, vb, bfloat16=True, precision="bf16", return_weights=True, **kw
                )
            )
    for emulated, hardware in zip(*results, strict=True):
        np.testing.assert_array_equal(emulated, hardware)


def test_bf16_denormal_inputs_count_as_zero(isa: str) -> None:
    """VDPBF16PS treats denormal operands as zero; the emulation too."""
    q, k, v = qkv(5)
    qb = bf16_bits(q)
    qb[..., 3] = 0x0001  # the smallest positive bf16 denormal
    qz = qb.copy()
    qz[..., 3] = 0
    got = _native.attention(
        qb, bf16_bits(k), bf16_bits(v), scale=1e30, bfloat16=True, precision="bf16"
    )
    want = _native.attention(
        qz, bf16_bits(k), bf16_bits(v), scale=1e30, bfloat16=True, precision="bf16"
    )
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_out_dtype_rounds_the_float32_output(isa: str, dtype: str, precision: str) -> None:
    q, k, v = qkv(6)
    (qx, _, flag), (kx, _, _), (vx, _, _) = (as_dtype(x, dtype) for x in (q, k, v))
    kw = {"scale": 0.2, "causal": 1, "precision": precision, **flag}
    out32, lse32, _ = _native.attention(qx, kx, vx, **kw)
    for out_dtype in ("input", "bfloat16", "float16", "float32"):
        out, lse, _ = _native.attention(qx, kx, vx, out_dtype=out_dtype, **kw)
        name = dtype if out_dtype == "input" else out_dtype
        np.testing.assert_array_equal(lse, lse32)
        if name == "bfloat16":
            assert out.dtype == np.uint16
            np.testing.assert_array_equal(out, bf16_bits(out32))
        elif name == "float16":
            assert out.dtype == np.float16
            np.testing.assert_array_equal(out, out32.astype(np.float16))
        else:
            np.testing.assert_array_equal(out, out32)


def test_auto_precision_follows_the_instruction(isa: str) -> None:
    """auto: bf16 products for bfloat16 inputs exactly where the build has the instruction;
    float16 and float32 inputs keep float32 products whatever the build."""
    q, k, v = qkv(7)
    qb, kb, vb = (bf16_bits(x) for x in (q, k, v))
    auto, _, _ = _native.attention(qb, kb, vb, scale=0.2, bfloat16=True)
    mode = "bf16" if _native.bf16_dot() else "fp32"
    assert _native.bf16_dot() == (isa == "avx512bf16")
    want, _, _ = _native.attention(qb, kb, vb, scale=0.2, bfloat16=True, precision=mode)
    np.testing.assert_array_equal(auto, want)
    for x, y, z in ((q, k, v), tuple(a.astype(np.float16) for a in (q, k, v))):
        auto, _, _ = _native.attention(x, y, z, scale=0.2)
        fp32, _, _ = _native.attention(x, y, z, scale=0.2, precision="fp32")
        np.testing.assert_array_equal(auto, fp32)


def test_float16_inputs_in_bf16_lose_only_what_bf16_rounding_of_them_loses() -> None:
    """float16 -> bf16 drops 3 significand bits: against exact attention on the float16 values,
    the scores move by at most 2u * scale * sum_d |q_d k_d| (u = 2^-8), which bounds how far
    each probability can move, on top of the P rounding."""
    q, k, v = qkv(8)
    qh, kh, vh = (x.astype(np.float16) for x in (q, k, v))
    out, _, _ = _native.attention(qh, kh, vh, scale=0.2, precision="bf16")
    q32, k32, v32 = (x.astype(np.float32) for x in (qh, kh, vh))
    ref_out, _, w = reference(q32, k32, v32, scale=0.2)
    ds = 2 * U_BF16 * 0.2 * np.einsum("bhid,bhjd->bhij", np.abs(q32), np.abs(k32).repeat(2, 1))
    drift = np.expm1(2 * ds.max(-1, keepdims=True))  # |p'/p - 1| <= e^(2 max|ds|) - 1
    va = torch.from_numpy(np.abs(v32)).double().repeat_interleave(2, dim=1)
    bound = ((drift + 2 * U_BF16) * (w @ va).numpy()) + 2e-5 * float(np.abs(v32).max())
    assert (np.abs(out - ref_out.numpy()) <= bound).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda q, k, v: _native.attention(q, k.astype(np.float32), v, scale=1.0),
         "^k: dtype float32 differs from q's float16"),
        (lambda q, k, v: _native.attention(q.view(np.uint16), k, v, scale=1.0),
         "^q: got uint16; 16-bit integer storage is read as bfloat16 only with bfloat16=True"),
        (lambda q, k, v: _native.attention(q.astype(np.float64), k, v, scale=1.0),
         "^q: expected dtype float32, float16 or bfloat16, got float64"),
        (lambda q, k, v: _native.attention(q, k, v, scale=1.0, precision="fp8"),
         "^precision: expected 'auto', 'fp32' or 'bf16', got 'fp8'"),
        (lambda q, k, v: _native.attention(q, k, v, scale=1.0, out_dtype="int8"),
         "^out_dtype: expected 'float32', 'bfloat16', 'float16' or 'input', got 'int8'"),
        (lambda q, k, v: _native.attention_maps(q, k, v, scale=1.0),
         "^q: attention_maps takes float32 tensors"),
    ],
)  # fmt: skip
def test_bad_dtypes_and_modes_are_refused_by_name(call: Any, message: str) -> None:
    q, k, v = (x.astype(np.float16) for x in qkv(9))
    with pytest.raises(ValueError, match=message):
        call(q, k, v)
