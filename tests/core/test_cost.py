"""service.core.cost against what the computations really do.

Memory: the model's peak for each method, option and shape must cover what numpy itself
reports allocating while the computation runs (tracemalloc traces numpy's data buffers), and not
overstate it wildly, or the limits would refuse work that fits. Work: the keys the exact kernel
visits, counted against the allowed (query, key) cells of the float64 reference's masks.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import service
from service.core import cost
from service.core.approx import FEATURE_CACHE
from service.core.maps import attention_map
from service.core.options import AttentionOptions, Window
from service.web.settings import Settings
from tests.support.memory_reference import visible
from tests.support.reference import allowed_matrix

MiB = 1 << 20

SHAPES = [  # (B, Hq, Hkv, Lq, Lk, D, Dv)
    (1, 1, 1, 512, 512, 64, 64),
    (2, 4, 2, 300, 700, 32, 16),  # GQA, Lq < Lk
    (1, 2, 2, 2000, 64, 16, 48),  # long queries, few keys
    (1, 1, 1, 64, 3000, 8, 8),  # few queries, long keys
]
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "exact": [{}, {"causal": True}, {"return_weights": True}, {"window": {"left": 16}}],
    "linear": [{}, {"causal": True}, {"return_weights": True}, {"compare": True}],
    "performer": [{}, {"causal": True}, {"return_weights": True}, {"compare": True}],
    "linformer": [{}, {"compare": True}, {"key_lengths": True}],
}


def peak_bytes(fn: Callable[[], Any]) -> int:
    """The most memory numpy held at once while fn ran, beyond what was held before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def _inputs(shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, ...]:
    b, hq, hkv, lq, lk, d, dv = shape
    rng = np.random.default_rng(seed)
    # float64, as the HTTP fronts decode JSON numbers: the float32 copies are counted
    return (
        rng.standard_normal((b, hq, lq, d)),
        rng.standard_normal((b, hkv, lk, d)),
        rng.standard_normal((b, hkv, lk, dv)),
    )


def assert_covers(model: int, measured: int) -> None:
    assert model >= measured, f"model {model / MiB:.2f} MiB < measured {measured / MiB:.2f} MiB"
    assert model <= 3 * measured + MiB, f"model {model / MiB:.2f} MiB >> {measured / MiB:.2f}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(
    "method, extra",
    [(m, o) for m, options in OPTIONS.items() for o in options],
    ids=lambda x: str(x) if isinstance(x, dict) else x,
)
def test_memory_model_covers_numpy_allocations(
    method: str, extra: dict[str, Any], shape: tuple[int, ...]
) -> None:
    q, k, v = _inputs(shape)
    if extra.get("key_lengths"):
        extra = {**extra, "key_lengths": [k.shape[2] // 2] * q.shape[0]}
    opts = AttentionOptions(method=method, **extra)
    small = tuple(a[..., :2, :] for a in (q, k, v))
    warm = opts.model_copy(update={"key_lengths": None})
    service.attention(*small, warm)  # once-per-process set-up (lazy imports) is no call's cost
    FEATURE_CACHE.clear()  # the performer's set-up is part of the cost when it is not cached
    model = cost.attention_cost(q.shape, k.shape, v.shape, opts, weights=opts.return_weights)
    measured = peak_bytes(lambda: service.attention(q, k, v, opts))
    assert_covers(model.bytes, measured)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
@pytest.mark.parametrize("bins, top_k", [((64, 64), 8), ((512, 700), 1), ((1, 1), 8)])
def test_memory_model_of_the_exact_maps(
    shape: tuple[int, ...], bins: tuple[int, int], top_k: int
) -> None:
    q, k, v = _inputs(shape)
    pq, pk = min(bins[0], q.shape[2]), min(bins[1], k.shape[2])
    model = cost.attention_cost(
        q.shape, k.shape, v.shape, AttentionOptions(), maps=(pq, pk, top_k), threads=1
    )
    measured = peak_bytes(lambda: attention_map(q, k, v, bins=(pq, pk), top_k=top_k, num_threads=1))
    assert_covers(model.bytes, measured)


def test_performer_setup_is_counted() -> None:
    """A large feature matrix alone (m x D float64) costs what the model says: the set-up is
    not free, and a bigger one is not cached."""
    q = np.zeros((1, 1, 1, 512))
    opts = AttentionOptions(method="performer", num_features=8192)
    FEATURE_CACHE.clear()
    model = cost.attention_cost(q.shape, q.shape, (1, 1, 1, 1), opts)
    w_bytes = 8192 * 512 * 8
    assert model.bytes >= w_bytes
    measured = peak_bytes(lambda: service.attention(q, q, np.ones((1, 1, 1, 1)), opts))
    assert measured >= w_bytes
    assert_covers(model.bytes, measured)
    assert FEATURE_CACHE.bytes == 0  # 32 MiB is over a quarter of the cache: not kept
    assert model.step == cost.QR_WEIGHT * 4 * 512**3 // 3  # one QR of a 512 x 512 block


def test_the_feature_cache_is_bounded_in_bytes() -> None:
    FEATURE_CACHE.clear()
    for seed in range(40):  # 40 x 128 x 1024 x 8 B = 40 MiB of matrices, 4 MiB each
        service.core.approx.performer_features(1024, 512, seed)
        assert FEATURE_CACHE.bytes <= FEATURE_CACHE.MAX_BYTES
    assert FEATURE_CACHE.bytes > FEATURE_CACHE.MAX_BYTES // 2  # it does keep what fits
    FEATURE_CACHE.clear()


@pytest.mark.parametrize("lq, lk", [(7, 7), (5, 11), (11, 5), (1, 9), (0, 4), (4, 0)])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"causal": "top_left"},
        {"causal": "bottom_right"},
        {"window": {"left": 2, "right": 1}},
        {"window": {"left": 1, "right": 0, "dilation": 2}, "causal": "bottom_right"},
        {"window": {"left": 0, "right": 0}, "global_tokens": [0, 3]},
    ],
    ids=str,
)
def test_visible_keys_bound_the_allowed_cells(lq: int, lk: int, options: dict[str, Any]) -> None:
    opts = AttentionOptions(**options)
    if opts.global_tokens and max(opts.global_tokens) >= lk:
        opts = opts.model_copy(update={"global_tokens": None})
    allowed = allowed_matrix(
        (1, 1, lq, lk),
        causal=opts.causal_mode or False,
        window=None if opts.window is None else opts.window.model_dump(),
        global_tokens=opts.global_tokens,
    )
    cells = int(allowed.sum())
    keys = cost.visible_keys(lq, lk, opts)
    assert cells <= keys <= lq * lk
    if opts.window is None:  # dense and causal rows are counted exactly
        assert keys == cells


def test_window_cost_grows_with_its_width_not_the_length() -> None:
    narrow = AttentionOptions(window=Window(left=64, right=0))
    shape = (1, 8, 32768, 64)
    dense = cost.attention_cost(shape, shape, shape, AttentionOptions())
    windowed = cost.attention_cost(shape, shape, shape, narrow)
    assert windowed.flops * 400 < dense.flops


@pytest.mark.parametrize(
    "length, segment, memory, compressed, rate, causal",
    [
        (40, 8, 8, 0, 1, True),
        (40, 8, 8, 2, 4, False),
        (37, 6, 12, 3, 2, True),
        (5, 8, 0, 0, 1, False),
    ],
)
def test_visible_keys_bound_the_memory_pattern(
    length: int, segment: int, memory: int, compressed: int, rate: int, causal: bool
) -> None:
    """Recurrent memory: the keys counted cover the cells the definition allows (raw keys and
    slots, listed query by query in tests/support/memory_reference.py), and stay near them."""
    spec = {"segment": segment, "length": memory, "compressed": compressed, "rate": rate}
    opts = AttentionOptions(memory=spec, causal=causal)
    raw, slots = visible(length, segment, memory, compressed, rate, causal)
    cells = int(raw.sum() + slots.sum())
    keys = cost.visible_keys(length, length, opts)
    assert cells <= keys <= length * (min(length, memory + segment) + compressed)


def test_memory_cost_is_linear_in_the_length_and_admitted_by_default() -> None:
    """L = 65536 with S = M = 512, C = 64 (the benchmark's run) costs O(L (S + M + C)), far
    below the dense L x L count, and fits the default ATTN_MAX_FLOPS."""
    opts = AttentionOptions(
        memory={"segment": 512, "length": 512, "compressed": 64, "rate": 4}, causal=True
    )
    shape = (1, 8, 65536, 64)
    recurrent = cost.attention_cost(shape, shape, shape, opts)
    dense = cost.attention_cost(shape, shape, shape, AttentionOptions(causal=True))
    assert recurrent.flops <= 2 * 8 * 65536 * (512 + 512 + 64) * 128
    assert recurrent.flops * 30 < dense.flops
    assert recurrent.flops <= Settings().max_flops < dense.flops


@pytest.mark.parametrize("causal", [False, True])
def test_visible_keys_of_packed_documents(causal: bool) -> None:
    cu = [0, 10, 10, 45, 60]
    opts = AttentionOptions(cu_seqlens=cu, causal=causal)
    cells = 0
    for s, e in zip(cu, cu[1:], strict=False):
        n = e - s
        cells += n * (n + 1) // 2 if causal else n * n
    keys = cost.visible_keys(60, 60, opts)
    assert cells <= keys <= 10 * 10 + 35 * 35 + 15 * 15
    if not causal:
        assert keys == cells
