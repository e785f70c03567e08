"""`distributed_attention`: one exact attention with its keys split across a Ray cluster.

q, k and v go into Ray's object store once each (ray.put; workers on one node read them
without a copy, other nodes fetch each once); every task computes one slice of the keys with
the kernel (service.core.split.partial_attention: positions absolute, so every masking option
keeps its meaning) and sends back its partial output and log-sum-exp; the driver merges them
exactly. Time on n nodes is about compute/n plus moving q, k, v to each node and the partial
outputs back (README, "Scaling out").
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.core import approx, cancel, exact
from service.core.errors import InputError
from service.core.inputs import ArrayLike, caller_rank, parse_options, to_output
from service.core.masking import prepare
from service.core.options import AttentionOptions, MaskingOptions
from service.core.results import AttentionResult
from service.core.split import (
    Partial,
    finish,
    key_slices,
    merge,
    partial_attention,
    plan_work,
    with_memory_keys,
)
from service.distributed.cluster import connect


@functools.cache
def _remote_slice_task() -> Any:
    # Registered with the cluster once per process. A task gets its arrays from the object
    # store, read-only and shared by the tasks of one node.
    return connect().remote(partial_attention)


@dataclass(frozen=True)
class SplitTimes:
    """Where the time of one call went (for benchmarks): wall time in all; putting the inputs
    into the object store; from the tasks' submission to the last partial result back; each
    slice's kernel time; the merge."""

    total_ms: float
    put_ms: float
    tasks_ms: float
    kernel_ms: list[float]
    merge_ms: float


def _gather(ray: Any, refs: list[Any]) -> list[Any]:
    """The tasks' results, in order. Inside a compute job of the service, a job abandoned while
    it waits (its request timed out, its client left) cancels the tasks not yet finished: a task
    still queued (no CPU free on the cluster) never runs, one running is interrupted."""
    token = cancel.current()
    pending = list(refs)
    while pending and token is not None:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.25)
        if pending and token.cancelled:
            for ref in pending:
                ray.cancel(ref)
            cancel.checkpoint()  # raises Cancelled, with the token's reason
    return list(ray.get(refs))


def distributed_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    options: MaskingOptions | dict[str, Any] | None = None,
    *,
    chunks: int,
    task_cpus: float = 1.0,
    num_threads: int | None = None,
    **option_kwargs: Any,
) -> AttentionResult:
    """service.attention with the keys split into `chunks` slices, each computed by a Ray task
    (task_cpus CPUs each, num_threads kernel threads: default one per whole CPU), merged
    exactly. Same arguments, options and result as service.attention (exact method only;
    float16 and bfloat16 inputs are computed from float32 copies, as with memory, and the
    result is float32; precision="bf16" rounds them for the kernel as the single call does).
    Connects to the running Ray cluster or RAY_ADDRESS, else starts a local one."""
    opts = parse_options(AttentionOptions, options, option_kwargs)
    return run_split(q, k, v, opts, chunks=chunks, task_cpus=task_cpus, num_threads=num_threads)[0]


def run_split(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    opts: AttentionOptions,
    *,
    chunks: int,
    task_cpus: float = 1.0,
    num_threads: int | None = None,
) -> tuple[AttentionResult, SplitTimes]:
    """distributed_attention with options already validated, and where its time went."""
    t0 = time.perf_counter()
    if opts.method != "exact":
        raise InputError(
            "method", f'distributed attention is exact attention; "{opts.method}" runs in one call'
        )
    if not (isinstance(task_cpus, (int, float)) and 0 < task_cpus <= 1024):
        raise InputError("task_cpus", f"must be in (0, 1024], got {task_cpus!r}")
    # Every check the single call would make, here, before anything is sent anywhere.
    q4, k4, v4, rank, _, peaks = prepare(q, k, v, opts)
    approx.check_options(opts)
    k4, v4 = with_memory_keys(opts, q4, k4, v4)  # compressed slots pooled once, here
    slices = key_slices(k4.shape[2], chunks, plan_work(opts, q4, k4))
    threads = num_threads or max(1, math.floor(task_cpus))
    ray = connect()
    task = _remote_slice_task().options(num_cpus=task_cpus)
    t_put = time.perf_counter()
    refs = [ray.put(a) for a in (q4, k4, v4, opts)]  # once each, shared by every task
    t_tasks = time.perf_counter()
    # The peaks (three floats) go with each task: no worker reads q, k, v whole to find them.
    partials: list[Partial] = _gather(
        ray, [task.remote(*refs, s, peaks=peaks, threads=threads) for s in slices]
    )
    t1 = time.perf_counter()
    out, lse, weights, slot_weights = finish(*merge(partials, opts), opts, q4.shape[2])
    t2 = time.perf_counter()

    def shaped(a: np.ndarray | None) -> ArrayLike:
        return None if a is None else to_output(caller_rank(a, rank), q)

    result = AttentionResult(
        output=shaped(out),
        weights=shaped(weights),
        lse=shaped(lse),
        elapsed_ms=(t2 - t0) * 1e3,
        flops=exact.dense_flops(q4, k4, v4),
        slot_weights=shaped(slot_weights),
    )
    times = SplitTimes(
        total_ms=(t2 - t0) * 1e3,
        put_ms=(t_tasks - t_put) * 1e3,
        tasks_ms=(t1 - t_tasks) * 1e3,
        kernel_ms=[p.elapsed_ms for p in partials],
        merge_ms=(t2 - t1) * 1e3,
    )
    return result, times
