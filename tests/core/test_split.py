"""Split-KV attention in one process (service.core.split): every masking option, keys cut into
1 to 8 slices, merged, gives service.attention's result within 1e-5 relative; and the same
against the float64 torch reference for a long causal case. (On a Ray cluster:
tests/distributed.)"""

from __future__ import annotations

import numpy as np
import pytest

import service
from service.core.errors import InputError
from service.core.inputs import parse_options
from service.core.masking import prepare
from service.core.options import AttentionOptions
from service.core.results import AttentionResult
from service.core.split import key_slices, plan_work, sequential
from tests.support.reference import reference_attention
from tests.support.split_cases import assert_same_result, cases, relative_error

CASES = cases()


def split_attention(q, k, v, chunks: int, **options) -> AttentionResult:
    opts = parse_options(AttentionOptions, None, options)
    q4, k4, v4, _, _, peaks = prepare(q, k, v, opts)
    out, lse, weights, slot_weights = sequential(q4, k4, v4, opts, chunks, peaks=peaks)
    return AttentionResult(out, weights, lse, 0.0, 0, slot_weights=slot_weights)


@pytest.mark.parametrize("chunks", range(1, 9))
@pytest.mark.parametrize(("name", "q", "k", "v", "options"), CASES, ids=[c[0] for c in CASES])
def test_split_equals_attention(name, q, k, v, options, chunks: int) -> None:
    want = service.attention(q, k, v, **options)
    assert_same_result(split_attention(q, k, v, chunks, **options), want)


def test_split_equals_the_float64_reference() -> None:
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 700, 32), dtype=np.float32) for _ in range(3))
    ref = reference_attention(q, k, v, causal="top_left", window={"left": 300, "right": 0})
    got = split_attention(q, k, v, 6, causal=True, window={"left": 300, "right": 0})
    assert relative_error(got.output, ref.output.numpy()) <= 1e-5


def test_slices_are_contiguous_and_even() -> None:
    assert key_slices(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert key_slices(5, 5) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    assert key_slices(0, 1) == [(0, 0)]
    for bad, msg in ((0, ">= 1"), (6, "at most one chunk per key"), (2.0, "integer")):
        with pytest.raises(InputError, match=msg) as err:
            key_slices(5, bad)
        assert err.value.loc == ("chunks",)


def test_causal_slices_hold_equal_work() -> None:
    """Causal: early keys are seen by more rows; the cuts follow the work, not the count."""
    q = np.zeros((1, 2, 4096, 8), dtype=np.float32)
    opts = AttentionOptions(causal=True)
    work = plan_work(opts, q, q)
    slices = key_slices(4096, 4, work)
    sizes = [b - a for a, b in slices]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1] / 3  # the first slice is short
    shares = [work(b) - work(a) for a, b in slices]
    assert max(shares) / min(shares) < 1.02
    # Work spread evenly (no mask): equal sizes; all keys masked away: equal sizes too.
    assert key_slices(4096, 4, plan_work(AttentionOptions(), q, q)) == key_slices(4096, 4)
    empty = AttentionOptions(key_lengths=[0])
    assert key_slices(4096, 4, plan_work(empty, q, q)) == key_slices(4096, 4)


def test_split_computes_in_the_precision_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """precision="bf16" reaches every slice's kernel call (it was once left out of the split),
    and the merged result is the bf16 computation's: close to the float64 reference of the
    bf16-rounded inputs."""
    import ml_dtypes

    from service.core import exact

    rng = np.random.default_rng(8)
    q, k, v = (rng.standard_normal((1, 2, 300, 64), dtype=np.float32) for _ in range(3))
    asked: list[str] = []
    real = exact.call_native

    def spy(fn, *args, **kwargs):
        asked.append(kwargs["precision"])
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(exact, "call_native", spy)
    got = split_attention(q, k, v, 3, precision="bf16", causal=True)
    assert asked == ["bf16"] * 3
    rounded = [x.astype(ml_dtypes.bfloat16).astype(np.float32) for x in (q, k, v)]
    ref = reference_attention(*rounded, causal="top_left").output.numpy()
    assert relative_error(got.output, ref) <= 1e-2
