"""distributed_attention against single-process attention, side by side on the same inputs.

N = 32768 (B = 1, H = 8, D = 64, float32, causal) by default: service.attention in this
process on all the cluster's CPUs as threads, then service.distributed_attention with the keys
split into 2 and 4 chunks on a local Ray cluster of the same CPUs (one task per chunk, one CPU
and one kernel thread each), interleaved in rounds so that each sees the same machine load.
Beside the times, where a distributed call's time goes: putting q, k, v into the object store,
the tasks (submission to the last partial back), the kernels inside them, the merge, and what
is left for scheduling and moving results (the overhead beyond the compute's critical path).
On one machine the split cannot be faster than the threads of one process; the figures show
its cost, and the README's model says where more nodes pay.

    .venv/bin/python -m tests.benchmarks.bench_distributed [--quick] [--rounds 3] [--n 32768]

Writes tests/benchmarks/results/distributed.json and distributed.md (`make bench-distributed`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.benchmarks.machine import describe, report, table, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N = 8192, one round")
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local cluster")
    ap.add_argument("--chunks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds = 8192, 1

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    import service
    from service.core.options import AttentionOptions
    from service.distributed.attention import run_split

    rng = np.random.default_rng(0)
    shape = (1, args.heads, args.n, args.dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False)
    try:
        # Warm-up: worker processes start, the task is registered, the kernel's caches fill.
        small = (x[:, :, :1024] for x in (q, k, v))
        run_split(*small, AttentionOptions(causal=True), chunks=max(args.chunks))
        single: list[dict[str, float]] = []
        split: dict[int, list[dict[str, Any]]] = {c: [] for c in args.chunks}
        for r in range(args.rounds):
            load = _load()
            t0 = time.perf_counter()
            ref = service.attention(q, k, v, causal=True, num_threads=args.cpus)
            single.append({"ms": (time.perf_counter() - t0) * 1e3, "load": load})
            print(f"round {r}: single process {single[-1]['ms']:.0f} ms (load {load})", flush=True)
            for c in args.chunks:
                load = _load()
                res, times = run_split(q, k, v, AttentionOptions(causal=True), chunks=c)
                err = float(np.abs(res.output - ref.output).max() / np.abs(ref.output).max())
                critical = max(max(times.kernel_ms), sum(times.kernel_ms) / args.cpus)
                split[c].append(
                    {
                        "ms": times.total_ms,
                        "put_ms": times.put_ms,
                        "tasks_ms": times.tasks_ms,
                        "kernel_ms": times.kernel_ms,
                        "merge_ms": times.merge_ms,
                        "critical_ms": critical,
                        "rel_error": err,
                        "load": load,
                    }
                )
                print(
                    f"round {r}: chunks {c}: {times.total_ms:.0f} ms (put {times.put_ms:.0f}, "
                    f"kernels {[round(x) for x in times.kernel_ms]}, merge "
                    f"{times.merge_ms:.0f}; error {err:.1e}; load {load})",
                    flush=True,
                )
    finally:
        ray.shutdown()

    single_ms = statistics.median(s["ms"] for s in single)
    rows = []
    for c, runs in split.items():
        med = {key: statistics.median(run[key] for run in runs) for key in
               ("ms", "put_ms", "tasks_ms", "merge_ms", "critical_ms")}  # fmt: skip
        overhead = med["ms"] - med["critical_ms"]
        rows.append(
            {
                "chunks": c,
                **med,
                "kernel_ms_median_run": runs[len(runs) // 2]["kernel_ms"],
                "ratio_to_single": med["ms"] / single_ms,
                "merge_and_put_share": (med["merge_ms"] + med["put_ms"]) / med["ms"],
                "overhead_share": overhead / med["ms"],
                "max_rel_error": max(run["rel_error"] for run in runs),
            }
        )
    loads = [s["load"] for s in single] + [r["load"] for runs in split.values() for r in runs]
    result = {
        "machine": describe(ray=ray.__version__),
        "case": {"B": 1, "H": args.heads, "N": args.n, "D": args.dim, "causal": True},
        "cluster_cpus": args.cpus,
        "rounds": args.rounds,
        "single_ms_median": single_ms,
        "single_runs": single,
        "split": rows,
        "split_runs": {str(c): runs for c, runs in split.items()},
        "load_1min": [min(loads), max(loads)],
    }
    write_results(args.out, "distributed", result, _markdown(result))


SPLIT_COLUMNS = (
    "chunks", "time (ms)", "/ single", "put (ms)", "kernels (ms, each)", "merge (ms)",
    "merge + put", "overhead beyond compute", "max rel. error",
)  # fmt: skip


def _split_row(row: dict[str, Any]) -> list[str]:
    return [
        str(row["chunks"]),
        f"{row['ms']:.0f}",
        f"{row['ratio_to_single']:.2f}",
        f"{row['put_ms']:.0f}",
        ", ".join(f"{x:.0f}" for x in row["kernel_ms_median_run"]),
        f"{row['merge_ms']:.0f}",
        f"{100 * row['merge_and_put_share']:.1f} %",
        f"{100 * row['overhead_share']:.1f} %",
        f"{row['max_rel_error']:.1e}",
    ]


def _markdown(r: dict[str, Any]) -> str:
    m, c = r["machine"], r["case"]
    return report(
        "distributed_attention against single-process attention",
        f"{m['cpu']}, {m['cores']} cores; Ray {m['ray']}, local cluster of "
        f"{r['cluster_cpus']} CPUs; B={c['B']} H={c['H']} N={c['N']} D={c['D']} causal, "
        f"float32; median of {r['rounds']} interleaved rounds; load average "
        f"{r['load_1min'][0]:.1f}-{r['load_1min'][1]:.1f} (shared machine: provisional).",
        f"Single process, {r['cluster_cpus']} threads: **{r['single_ms_median']:.0f} ms**.",
        table(SPLIT_COLUMNS, "rrrrlrrrr", map(_split_row, r["split"])),
        "Overhead beyond compute: the time not explained by the kernels' critical path "
        "(the longest kernel, or their sum over the CPUs if longer): putting inputs, "
        "scheduling, moving partial results back, merging.",
    )


if __name__ == "__main__":
    main()
