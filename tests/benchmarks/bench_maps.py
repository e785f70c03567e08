"""Time of the exact attention maps (service.core.maps) against L, per head, beside pass 1 alone.

Pass 1 is the attention kernel (which also yields each row's log-sum-exp); the maps add pass 2
(scores recomputed, reduced into a 1024x1024 pooled map, entropy, top-8, column sums).
Usage: python -m tests.benchmarks.bench_maps [--quick]; prints a markdown table. The load
average before and after is printed too: on a shared machine the figures are only as good as
the quiet they were taken in.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from service import _native


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="L up to 8192 only")
    args = parser.parse_args()
    lengths = [4096, 8192] if args.quick else [4096, 8192, 16384, 32768]
    masks: dict[str, dict[str, int]] = {
        "dense": {},
        "causal": {"causal": 1},
        "window 512": {"window_left": 512, "window_right": 0},
    }
    d = 64
    print(f"isa {_native.isa()}, threads {_native.get_num_threads()}, D = {d}, one head")
    print(f"load average before: {os.getloadavg()}")
    print("| L | mask | pass 1 alone (s) | maps, both passes (s) | pass 2 (s) |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for length in lengths:
        q, k, v = (rng.standard_normal((1, 1, length, d)).astype(np.float32) for _ in range(3))
        repeats = 1 if length >= 32768 else 3
        for name, kw in masks.items():
            p1 = best(partial(_native.attention, q, k, v, scale=d**-0.5, **kw), repeats)
            maps = partial(_native.attention_maps, q, k, v, scale=d**-0.5, **kw)
            both = best(partial(maps, bins_q=1024, bins_k=1024, top_k=8), repeats)
            print(f"| {length} | {name} | {p1:.3f} | {both:.3f} | {both - p1:.3f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
