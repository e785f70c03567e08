"""`attention`: scaled dot-product attention on numpy arrays or any library's (frameworks.py).

Inputs are normalised and checked (service.core.inputs), the options validated into the one
options model, the masking options turned into the kernel's arguments; then the exact kernel
runs (service.core.exact), or one of the approximations (service.core.approx). Results come
back in the caller's rank and type.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.core import approx, exact, memory
from service.core.inputs import (
    ArrayLike,
    Peaks,
    caller_rank,
    parse_options,
    thread_count,
    to_output,
)
from service.core.masking import prepare
from service.core.options import AttentionOptions, MaskingOptions
from service.core.results import AttentionResult


def attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    options: MaskingOptions | dict[str, Any] | None = None,
    *,
    num_threads: int | None = None,
    **option_kwargs: Any,
) -> AttentionResult:
    """Exact scaled dot-product attention (see service.core.options for every option's meaning).

    q (Lq, D), (Hq, Lq, D) or (B, Hq, Lq, D); k (.., Hkv, Lk, D); v (.., Hkv, Lk, Dv), one rank
    for all three; arrays of any library (numpy, torch, TensorFlow, JAX, DLPack) and any float
    dtype; results in q's library. float16 and bfloat16 (ml_dtypes' in numpy) are read by the
    kernel as they are when all three share the dtype (see the options out_dtype and precision);
    anything else is computed in float32.
    Keyword options override those in `options`. A rank-2/3 q is treated as B = 1 (and Hq = 1),
    so a mask is broadcast right-aligned against (B, Hq, Lq, Lk) as numpy and torch would.
    """
    opts = parse_options(AttentionOptions, options, option_kwargs)
    threads = thread_count(num_threads)
    exact_method = opts.method == "exact"
    # 16-bit inputs stay 16-bit for the kernel, except with memory (slots are pooled in float32).
    keep_half = exact_method and opts.memory is None
    q4, k4, v4, rank, kw, peaks = prepare(q, k, v, opts, keep_half=keep_half)
    approx.check_options(opts)  # options the chosen method does not support are errors
    if not exact_method:
        return _approximation(q, q4, k4, v4, opts, rank, peaks)
    memory.check_options(opts, q4.shape[2], k4.shape[2])
    if opts.memory is not None:  # compressed slots become keys after the raw ones
        k4, v4, kw = memory.with_slots(k4, v4, opts.memory, kw)  # the same peaks (with_slots)
    rows = opts.weights_rows
    out, lse, weights, elapsed = exact.run(q4, k4, v4, opts, kw, peaks=peaks, threads=threads)
    slot_weights = None
    if opts.memory is not None and weights is not None:
        weights, slot_weights = memory.split_weights(weights, q4.shape[2])
    if rows is not None:
        lse = lse[:, :, rows]  # the rows asked for, in their order, as the weights

    def shaped(a: np.ndarray | None) -> ArrayLike:
        return None if a is None else to_output(caller_rank(a, rank), q)

    return AttentionResult(
        output=shaped(out),
        weights=shaped(weights),
        lse=shaped(lse) if weights is not None else None,
        elapsed_ms=elapsed,
        flops=exact.dense_flops(q4, k4, v4),
        slot_weights=shaped(slot_weights),
    )


def _approximation(
    like: ArrayLike,
    q4: np.ndarray,
    k4: np.ndarray,
    v4: np.ndarray,
    opts: AttentionOptions,
    rank: int,
    peaks: Peaks,
) -> AttentionResult:
    """`approx.run` in the caller's rank and type (`like` is the caller's q).

    The comparison's maps and per-head errors take q's leading dims too; they stay numpy.
    """
    res = approx.run(q4, k4, v4, opts, peaks=peaks)

    def shaped(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else caller_rank(a, rank)

    comparison = res.comparison
    if comparison is not None:
        for key in ("implied_map", "exact_map", "rel_error_per_head"):
            comparison[key] = shaped(comparison[key])
    return AttentionResult(
        output=to_output(shaped(res.output), like),
        weights=to_output(shaped(res.weights), like),
        lse=to_output(shaped(res.lse), like),
        elapsed_ms=res.elapsed_ms,
        flops=res.flops,
        method=opts.method,
        comparison=comparison,
    )
