"""Exact attention split along the keys (split-KV, as in FlashDecoding and ring attention).

Each slice [a, b) of the keys gives a partial result: the softmax over that slice's allowed keys
(output, and its log-sum-exp lse_c per query row). The kernel computes it with every position
kept absolute (native key_begin/key_end), so causality, windows, ALiBi, global tokens, masks and
block layouts mean exactly what they mean for the whole call. The partials merge exactly:

    lse = log sum_c exp(lse_c),    output = sum_c exp(lse_c - lse) * output_c

and the weights are the slices' weights, each scaled by exp(lse_c - lse), side by side. A slice
in which a row sees no key has lse_c = -inf and adds nothing. No cluster here: these are the
pieces service.distributed runs on Ray workers, and anyone can run them in a loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service import _native
from service.core import exact, memory
from service.core.errors import InputError
from service.core.inputs import Peaks
from service.core.masking import native_masking
from service.core.options import AttentionOptions

MAX_CHUNKS = 4096


@dataclass(frozen=True)
class Partial:
    """One slice's result, 4-D: output (B, Hq, Lq, Dv) and lse (B, Hq, Lq) over the slice's
    keys (0 and -inf where a row sees none of them); weights (B, Hq, rows, b - a) of the slice's
    columns when asked; the kernel's time."""

    keys: tuple[int, int]
    output: np.ndarray
    lse: np.ndarray
    weights: np.ndarray | None
    elapsed_ms: float


def key_slices(
    lk: int, chunks: int, work: Callable[[int], int] | None = None
) -> list[tuple[int, int]]:
    """`chunks` contiguous, non-empty slices of range(lk). Without `work`, of near-equal
    sizes; with it (work(x): the pairs the kernel visits in keys [0, x), non-decreasing), cut
    so that each slice holds about as much work: with causal masking the early keys are seen
    by more rows, and equal sizes would leave the first slice with most of it."""
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        raise InputError("chunks", f"must be an integer >= 1, got {chunks!r}")
    if chunks > max(lk, 1):
        raise InputError("chunks", f"{chunks} chunks for {lk} keys: at most one chunk per key")
    if chunks > MAX_CHUNKS:
        raise InputError("chunks", f"{chunks} chunks; at most {MAX_CHUNKS}")
    total = work(lk) if work is not None and lk else 0
    if work is None or total == 0:
        edges = [(c * lk) // chunks for c in range(chunks + 1)]
    else:
        edges = [0]
        for c in range(1, chunks):
            # The first x (leaving a key for each slice still to come) with work(x) >= share.
            lo, hi = edges[-1] + 1, lk - (chunks - c)
            share = total * c / chunks
            while lo < hi:
                mid = (lo + hi) // 2
                if work(mid) >= share:
                    hi = mid
                else:
                    lo = mid + 1
            edges.append(lo)
        edges.append(lk)
    return list(zip(edges[:-1], edges[1:], strict=True))


def with_memory_keys(
    opts: AttentionOptions, q4: np.ndarray, k4: np.ndarray, v4: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """k and v as the kernel sees them: with `memory`, the compressed slots pooled once and
    appended after the raw keys (so slices of the key axis cut through raw keys and slots
    alike); the options checked against the memory pattern first. The checks' Peaks still hold
    (memory.with_slots)."""
    memory.check_options(opts, q4.shape[2], k4.shape[2])
    if opts.memory is None:
        return k4, v4
    k_ext, v_ext, _ = memory.with_slots(k4, v4, opts.memory, {})
    return k_ext, v_ext


def _kernel_masking(opts: AttentionOptions, q4: np.ndarray, k4: np.ndarray) -> dict[str, Any]:
    """The kernel's masking arguments for q4 and k4 (k4 with its slots, when memory has them)."""
    b, hq, lq, _ = q4.shape
    lk = k4.shape[2]
    if opts.memory is not None:  # the masking options are checked against the raw keys
        return {**native_masking(opts, (b, hq, lq, lq)), **memory.native_memory(opts.memory)}
    return native_masking(opts, (b, hq, lq, lk))


def plan_work(opts: AttentionOptions, q4: np.ndarray, k4: np.ndarray) -> Callable[[int], int]:
    """work(x): the (query row, key) pairs the kernel visits in keys [0, x), over every batch
    and head, from the mask plan (microseconds, never O(Lq x Lk)). k4 as with_memory_keys
    gives it."""
    b, hq, lq, _ = q4.shape
    lk = k4.shape[2]
    masking = _kernel_masking(opts, q4, k4)
    for score_only in ("softcap", "alibi_slopes"):  # shape the scores, not the plan
        masking.pop(score_only, None)

    def work(x: int) -> int:
        plan = _native.mask_plan(b, hq, lq, lk, key_end=x, kernel="attention", **masking)
        return int(plan["pairs"])

    return work


def partial_attention(
    q4: np.ndarray,
    k4: np.ndarray,
    v4: np.ndarray,
    opts: AttentionOptions,
    keys: tuple[int, int],
    *,
    peaks: Peaks,
    threads: int,
) -> Partial:
    """Attention of checked 4-D float32 arrays over the keys [a, b) only, positions absolute
    (k4 and v4 as with_memory_keys gives them; `peaks` their max|x| as the checks found them,
    so that no slice reads the whole arrays again)."""
    a, b = keys
    masking = _kernel_masking(opts, q4, k4)
    masking.update(key_begin=a, key_end=b)
    # Empty rows as zeros here, whatever was asked: the merge decides what an empty row is.
    zero = opts.model_copy(update={"empty_rows": "zero"})
    out, lse, weights, elapsed = exact.run(q4, k4, v4, zero, masking, peaks=peaks, threads=threads)
    if weights is not None:
        weights = np.ascontiguousarray(weights[..., a:b])  # the other columns are zeros
    return Partial((a, b), out, lse, weights, elapsed)


def merge(
    partials: Sequence[Partial], opts: AttentionOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(output, lse, weights or None), 4-D float32, of the whole call from its slices' partials
    (in key order); empty rows as opts.empty_rows says."""
    lses = np.stack([p.lse.astype(np.float64) for p in partials])
    with np.errstate(invalid="ignore"):  # -inf - -inf in rows no slice allows
        lse = np.logaddexp.reduce(lses, axis=0)
        factors = np.exp(lses - lse)
    factors[np.isnan(factors)] = 0.0  # a row empty everywhere: every factor is 0
    out = np.zeros(partials[0].output.shape, dtype=np.float64)
    for f, p in zip(factors, partials, strict=True):
        out += f[..., None] * p.output
    weights = None
    if partials[0].weights is not None:
        rows = opts.weights_rows
        weights = np.concatenate(
            [
                (f[..., None] if rows is None else f[:, :, rows, None]) * p.weights
                for f, p in zip(factors, partials, strict=True)
            ],
            axis=-1,
        ).astype(np.float32)
    out32, lse32 = out.astype(np.float32), lse.astype(np.float32)
    if opts.empty_rows == "nan":
        empty = np.isneginf(lse32)
        exact.nan_where_empty(lse32, out32)
        if weights is not None:
            weights[empty if opts.weights_rows is None else empty[:, :, opts.weights_rows]] = np.nan
    return out32, lse32, weights


def finish(
    out: np.ndarray, lse: np.ndarray, weights: np.ndarray | None, opts: AttentionOptions, lq: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The merged arrays as service.attention returns them: (output, lse, weights,
    slot_weights); lse only with the weights, of the rows asked for; with memory, the weights
    over the raw keys and the compressed slots apart."""
    if opts.weights_rows is not None:
        lse = lse[:, :, opts.weights_rows]
    if weights is None:
        return out, None, None, None
    if opts.memory is not None:
        raw, slots = memory.split_weights(weights, lq)
        return out, lse, raw, slots
    return out, lse, weights, None


def sequential(
    q4: np.ndarray,
    k4: np.ndarray,
    v4: np.ndarray,
    opts: AttentionOptions,
    chunks: int,
    *,
    peaks: Peaks,
    threads: int = 1,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The split computed in this process, slice after slice (what the workers do, in a loop):
    finish's (output, lse, weights, slot_weights). `peaks` as the checks (prepare) found them."""
    k4, v4 = with_memory_keys(opts, q4, k4, v4)
    slices = key_slices(k4.shape[2], chunks, plan_work(opts, q4, k4))
    parts = [partial_attention(q4, k4, v4, opts, s, peaks=peaks, threads=threads) for s in slices]
    return finish(*merge(parts, opts), opts, q4.shape[2])
