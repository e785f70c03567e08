"""Random attention calls covering every masking option, for the split-KV tests
(tests/core/test_split.py in one process, tests/distributed on a Ray cluster), and the
comparison they share: the split result must be service.attention's within 1e-5 relative."""

from __future__ import annotations

from typing import Any

import numpy as np

# (name, q shape, k shape, v shape, options); the arrays are drawn from a seed per case.
Case = tuple[str, dict[str, Any]]


def cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]]:
    rng = np.random.default_rng(17)

    def qkv(b: int, hq: int, hkv: int, lq: int, lk: int, d: int = 16, dv: int = 12):
        return (
            rng.standard_normal((b, hq, lq, d), dtype=np.float32),
            rng.standard_normal((b, hkv, lk, d), dtype=np.float32),
            rng.standard_normal((b, hkv, lk, dv), dtype=np.float32),
        )

    out = []

    def add(name: str, arrays: tuple[np.ndarray, ...], **options: Any) -> None:
        out.append((name, *arrays, options))

    add("full, GQA", qkv(2, 4, 2, 37, 53))
    add("causal top-left, Lq < Lk", qkv(1, 2, 2, 30, 70), causal=True)
    add("causal bottom-right, Lq < Lk", qkv(1, 2, 1, 30, 70), causal="bottom_right")
    add("causal, Lq > Lk (empty rows)", qkv(1, 1, 1, 60, 25), causal="bottom_right",
        return_weights=True)  # fmt: skip
    add("window with dilation", qkv(1, 2, 2, 64, 64), window={"left": 9, "right": 4, "dilation": 2})
    add("window and global tokens spanning chunks", qkv(2, 2, 2, 80, 80),
        window={"left": 5, "right": 0}, global_tokens=[0, 31, 79], causal=True)  # fmt: skip
    add("ALiBi, softcap, scale", qkv(1, 4, 4, 40, 90), alibi_slopes=True, softcap=5.0, scale=0.7)
    add("ALiBi slopes, cross", qkv(1, 2, 2, 20, 50), alibi_slopes=[0.3, 0.05], causal=True)
    b, h, lq, lk = 2, 2, 33, 47
    mask = rng.random((1, 1, lq, lk)) < 0.7
    mask[0, 0, 5] = False  # a row no key is allowed in
    add("bool mask, empty rows as NaN", qkv(b, h, h, lq, lk), mask=mask, empty_rows="nan",
        return_weights=True)  # fmt: skip
    add("bool mask, ignore convention", qkv(b, h, h, lq, lk), mask=~mask,
        mask_convention="ignore")  # fmt: skip
    fmask = rng.standard_normal((b, 1, lq, lk)).astype(np.float32)
    fmask[:, :, :, 20:30] = -np.inf
    add("float mask", qkv(b, h, h, lq, lk), mask=fmask)
    add("key lengths", qkv(3, 2, 2, 24, 61), key_lengths=[61, 17, 0], causal="bottom_right")
    add("block pattern (bigbird)", qkv(1, 2, 2, 96, 96),
        block_mask={"block_size": 16, "pattern": {"kind": "bigbird", "window": 1,
                    "global_blocks": 1, "random_blocks": 1, "seed": 3}})  # fmt: skip
    layout = rng.random((1, 2, 4, 5)) < 0.5
    add("block layout", qkv(1, 2, 1, 60, 75), block_mask={"block_size": [16, 16],
        "layout": layout}, causal=True)  # fmt: skip
    add("packed documents", qkv(1, 2, 2, 70, 70), cu_seqlens=[0, 20, 21, 55, 70], causal=True)
    add("weights of some rows", qkv(1, 2, 2, 40, 40), weights_rows=[39, 0, 17], causal=True)
    # Recurrent memory: segments' raw memory spanning chunks, and compressed slots (extra keys
    # after the raw ones, on the same split axis).
    add("memory, raw only", qkv(1, 2, 1, 50, 50), memory={"segment": 8, "length": 12},
        causal=True)  # fmt: skip
    add("memory, compressed (mean)", qkv(1, 2, 2, 64, 64), memory={"segment": 8, "length": 8,
        "compressed": 3, "rate": 4}, causal=True, return_weights=True)  # fmt: skip
    add("memory, compressed (max), not causal", qkv(2, 2, 2, 48, 48), memory={"segment": 12,
        "length": 4, "compressed": 2, "rate": 2, "pool": "max"})  # fmt: skip
    return out


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (NaN where both are NaN counts as equal)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = ~np.isnan(want)
    scale = np.abs(want[finite]).max(initial=0.0)
    diff = np.abs(got[finite] - want[finite]).max(initial=0.0)
    return 0.0 if diff == 0 else diff / max(scale, 1e-30)


def assert_same_result(got: Any, want: Any, tol: float = 1e-5) -> None:
    """The split result is service.attention's: output, and weights (and the compressed
    memory's slot_weights) and lse when given."""
    assert relative_error(got.output, want.output) <= tol
    assert (got.weights is None) == (want.weights is None)
    assert (got.slot_weights is None) == (want.slot_weights is None)
    if want.slot_weights is not None:
        assert relative_error(got.slot_weights, want.slot_weights) <= tol
    if want.weights is not None:
        assert relative_error(got.weights, want.weights) <= tol
        lse_got, lse_want = np.asarray(got.lse), np.asarray(want.lse)
        np.testing.assert_array_equal(np.isneginf(lse_got), np.isneginf(lse_want))
        finite = np.isfinite(lse_want)
        assert relative_error(lse_got[finite], lse_want[finite]) <= tol
