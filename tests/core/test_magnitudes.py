"""The magnitude rules (service.core.magnitudes) on every path, fed by the input checks.

Each input is read once per call for its max|x| (the finiteness check finds it; the rules reuse
it): counted by spying on the one function that scans, inputs._magnitude. Values whose weighted
sums would overflow float32 are still scaled and answered exactly (against float64 torch), and
inputs beyond the rules are refused naming the tensor, on paths other tests leave out.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import pytest

import service
from service import _native
from service.core import inputs
from service.core.errors import InputError
from service.core.inputs import F32_SAFE
from service.core.masking import prepare
from service.core.memory import pool_slots
from service.core.options import AttentionOptions
from service.core.split import sequential
from tests.support.memory_reference import memory_reference
from tests.support.reference import random_qkv, reference_attention

# Distinct sizes, so that a scan tells which input it read: q 640, k 448, v 672 values.
SHAPES = (1, 2, 1, 40, 56, 8, 12)
# Self-attention (memory needs Lq = Lk): q 2048, k 1024, v 1536 values.
SELF_SHAPES = (1, 4, 2, 64, 64, 8, 12)


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every array a max|x| pass reads."""
    seen: list[int] = []
    real = inputs._magnitude

    def counting(arr: np.ndarray) -> float:
        seen.append(arr.size)
        return real(arr)

    monkeypatch.setattr(inputs, "_magnitude", counting)
    return seen


def once_each(*arrays: Any) -> list[int]:
    return sorted(int(np.prod(a.shape)) for a in arrays)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"window": {"left": 8, "right": 0}},
        {"causal": True, "return_weights": True},
        {"method": "linear"},
        {"method": "performer", "compare": True},
        {"method": "linformer", "compare": True},
    ],
    ids=["plain", "window", "causal-weights", "linear", "performer-compare", "linformer-compare"],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_attention_reads_each_input_once(
    scans: list[int], options: dict[str, Any], dtype: type
) -> None:
    """float32 as it is, float64 converted, float16 / bfloat16 kept (exact) or converted
    (approximations): each input array scanned once, whatever the method."""
    q, k, v = (a.astype(dtype) for a in random_qkv(*SHAPES))
    service.attention(q, k, v, **options)
    assert sorted(scans) == once_each(q, k, v)


def test_mixed_dtypes_are_read_once_after_conversion(scans: list[int]) -> None:
    q, k, v = random_qkv(*SHAPES)
    service.attention(q.astype(ml_dtypes.bfloat16), k, v.astype(np.float16))
    assert sorted(scans) == once_each(q, k, v)


def test_memory_and_maps_read_each_input_once(scans: list[int]) -> None:
    q, k, v = random_qkv(*SELF_SHAPES)
    mem = {"segment": 16, "length": 16, "compressed": 2, "rate": 4}
    service.attention(q, k, v, memory=mem, causal=True)
    assert sorted(scans) == once_each(q, k, v)
    scans.clear()
    service.attention_map(q, k, v, causal=True, bins=8)
    assert sorted(scans) == once_each(q, k, v)


def test_split_reads_each_input_once_for_all_its_slices(scans: list[int]) -> None:
    q, k, v = random_qkv(*SHAPES)
    opts = AttentionOptions(causal="bottom_right")
    q4, k4, v4, _, _, peaks = prepare(q, k, v, opts)
    sequential(q4, k4, v4, opts, 4, peaks=peaks)
    assert sorted(scans) == once_each(q, k, v)


def test_a_session_reads_a_segment_once(scans: list[int]) -> None:
    """Besides the segment, only the memory it joins (M raw positions and C slots) is read."""
    q, k, v = random_qkv(*SELF_SHAPES)
    session = service.MemorySession({"length": 16, "compressed": 2, "rate": 4}, causal=True)
    session.append(*(x[:, :, :32] for x in (q, k, v)))
    scans.clear()
    segment = [x[:, :, 32:] for x in (q, k, v)]
    session.append(*segment)
    state = session.state
    memory = once_each(*(a for a in (state.raw_k, state.raw_v, state.slot_k, state.slot_v)))
    assert all(n < min(once_each(*segment)) for n in memory)  # told apart by size
    assert sorted(n for n in scans if n not in memory) == once_each(*segment)


@pytest.mark.parametrize("given", ["query", "query-key", "query-key-value"])
def test_multihead_reads_each_tensor_once(scans: list[int], given: str) -> None:
    """A defaulted key or value is the query (or key) itself: read once, not once per role."""
    rng = np.random.default_rng(0)
    query = rng.standard_normal((2, 10, 16), dtype=np.float32)  # 320 values
    key = rng.standard_normal((2, 13, 16), dtype=np.float32)  # 416
    value = rng.standard_normal((2, 13, 24), dtype=np.float32)  # 624; no weight has these sizes
    tensors = {"query": query, "key": key, "value": value}
    passed = [tensors[name] for name in given.split("-")]
    service.multihead_attention(*passed, num_heads=4)
    weights = {256, 384, 16}  # the projections (16 x 16, 16 x 24) and biases
    assert sorted(n for n in scans if n not in weights) == once_each(*passed)


# ---------------------------------------------------------------------------------------------
# Large values: scaled and exact


def huge_v(shapes: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, ...]:
    """q, k standard normal; v of max|v| about 4e36: sums over the keys pass float32's range."""
    q, k, v = random_qkv(*shapes, seed=seed)
    v = v * np.float32(1e36)
    assert np.abs(v).max() * k.shape[2] > F32_SAFE
    return q, k, v


@pytest.fixture
def kernel_v_peaks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """max|v| of each v the attention kernel receives."""
    seen: list[float] = []
    real = _native.attention

    def spy(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: Any) -> Any:
        seen.append(float(np.abs(v).max()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(_native, "attention", spy)
    return seen


@pytest.mark.parametrize(
    "options", [{}, {"window": {"left": 8, "right": 2}}, {"causal": "bottom_right"}], ids=str
)
def test_huge_values_are_scaled_and_exact(
    options: dict[str, Any], kernel_v_peaks: list[float]
) -> None:
    q, k, v = huge_v(SHAPES)
    res = service.attention(q, k, v, **options)
    assert kernel_v_peaks and max(kernel_v_peaks) <= 1.0  # the kernel summed v scaled down
    ref = reference_attention(q, k, v, **options).output.numpy()
    vmax = float(np.abs(v).max())
    assert np.isfinite(res.output).all()
    np.testing.assert_allclose(res.output, ref, rtol=1e-4, atol=2e-6 * vmax)


def test_huge_values_through_maps_and_split() -> None:
    q, k, v = huge_v(SHAPES, seed=1)
    ref = reference_attention(q, k, v, causal="bottom_right").output.numpy()
    atol = 2e-6 * float(np.abs(v).max())
    maps = service.attention_map(q, k, v, causal="bottom_right", bins=4)
    np.testing.assert_allclose(maps.output, ref, rtol=1e-4, atol=atol)
    opts = AttentionOptions(causal="bottom_right")
    q4, k4, v4, _, _, peaks = prepare(q, k, v, opts)
    out = sequential(q4, k4, v4, opts, 3, peaks=peaks)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_huge_values_with_compressed_memory(pool: str) -> None:
    """The slots pool v near float32's top; the peaks the checks found still bound them."""
    q, k, v = huge_v(SELF_SHAPES, seed=2)
    mem = {"segment": 16, "length": 16, "compressed": 2, "rate": 4, "pool": pool}
    res = service.attention(q, k, v, memory=mem, causal=True)
    ref = memory_reference(q, k, v, causal=True, **mem)
    np.testing.assert_allclose(res.output, ref.output, rtol=1e-4, atol=2e-6 * np.abs(v).max())


@pytest.mark.parametrize("pool", ["mean", "max"])
@pytest.mark.parametrize("rate", [1, 3, 64])
def test_slots_never_exceed_the_values_they_pool(pool: str, rate: int) -> None:
    """What lets the memory option reuse the inputs' max|x| for keys and values with slots."""
    rng = np.random.default_rng(rate)
    top = np.finfo(np.float32).max
    x = (rng.uniform(0.999, 1.0, (2, 3, 200, 8)) * top).astype(np.float32)
    x[1] = np.float32(top)  # a block of equal values at float32's max: their mean is it
    x[0, 0] *= -1
    assert np.abs(pool_slots(x, rate, pool)).max() <= np.abs(x).max()


# ---------------------------------------------------------------------------------------------
# Refusals on paths without them elsewhere


def refused(call: Any, loc: tuple[str, ...], what: str) -> None:
    with pytest.raises(InputError) as info:
        call()
    assert info.value.loc == loc and f"values too large: {what} could reach" in str(info.value)


def test_approximations_refuse_what_their_products_cannot_hold() -> None:
    q, k, v = random_qkv(*SHAPES)
    big = np.float32(1e18)
    refused(
        lambda: service.attention(q * big, k * big, v, method="linear"),
        ("q",),
        "phi(q).phi(k) over the keys",
    )
    refused(
        lambda: service.attention(q, k, v * np.float32(1e37), method="linformer"),
        ("v",),
        "the projected values F v",
    )
    refused(
        lambda: service.attention(q * big, k * big, v, method="performer"),
        ("q",),
        "scale * q.k",
    )


def test_maps_split_and_sessions_refuse_overflowing_scores() -> None:
    q, k, v = random_qkv(*SELF_SHAPES)
    q, k = q * np.float32(1e19), k * np.float32(1e19)
    refused(lambda: service.attention_map(q, k, v), ("q",), "scale * q.k")
    opts = AttentionOptions()
    q4, k4, v4, _, _, peaks = prepare(q, k, v, opts)
    refused(lambda: sequential(q4, k4, v4, opts, 2, peaks=peaks), ("q",), "scale * q.k")
    session = service.MemorySession({"length": 16})
    refused(lambda: session.append(q, k, v), ("q",), "scale * q.k")
