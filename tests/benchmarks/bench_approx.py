"""Approximate attention against exact: time against sequence length, and what it costs.

For L from 1k to 64k (B = 1, one head, D = Dv = 64, float32, through `service.attention`):
exact, exact with a ±128 window, linear (elu+1), performer (FAVOR+, default ceil(D ln D)
features) and linformer (k = 256, non-causal only), each non-causal and causal (the causal
window is the 128 keys before the diagonal). The error of each is the relative Frobenius
error of its output against exact attention on the same input, for three inputs:
- "random": q, k, v with independent N(0, 1) entries (scores q.k/8 ~ N(0, 1): diffuse);
- "random, small q, k": the same with q and k halved (near-uniform attention, small
  |q|, |k|: the regime where FAVOR+'s variance, which grows like exp(|q + k|^2 / 8), is low);
- "q = k": the keys used as queries, so each query favours itself (peaked, local attention at
  short L: the case a window gets right and a low-rank approximation does not).

Writes tests/benchmarks/results/approx.json, approx.md and approx.png.

    make bench-approx            # L = 1k .. 64k (several minutes; exact at 64k is the slow part)
    make bench-approx QUICK=1    # L = 1k .. 4k
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import service
from tests.benchmarks.machine import describe

RESULTS = Path(__file__).parent / "results"
D = 64
WINDOW = 128
METHODS = ["exact", "window", "linear", "performer", "linformer"]
STYLE = {
    "exact": "k",
    "window": "tab:gray",
    "linear": "tab:blue",
    "performer": "tab:orange",
    "linformer": "tab:green",
}


def options(method: str, causal: bool) -> dict[str, Any]:
    if method == "window":
        return {"causal": causal, "window": {"left": WINDOW, "right": 0 if causal else WINDOW}}
    if method == "exact":
        return {"causal": causal}
    return {"method": method, "causal": causal}


def timed(fn: Callable[[], Any], reps: int) -> tuple[Any, float]:
    """(last result, fastest wall time in ms of reps runs).

    The fastest run, not the median: on a shared machine the other runs measure the
    neighbours' load rather than this code.
    """
    times, result = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return result, min(times)


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    a64, r64 = a.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(a64 - r64) / np.linalg.norm(r64))


INPUTS = ["random", "random, small q, k", "q = k"]


def inputs(n: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 1, n, D), dtype=np.float32) for _ in range(3))
    return {INPUTS[0]: (q, k, v), INPUTS[1]: (q / 2, k / 2, v), INPUTS[2]: (k, k, v)}


def bench(lengths: list[int], reps_until: int) -> list[dict[str, Any]]:
    rows = []
    for n in lengths:
        data = inputs(n, seed=n)
        exact_reps = 3 if n <= reps_until else 1  # exact at 64k takes tens of seconds
        for causal in (False, True):
            exact: dict[str, np.ndarray] = {}
            for name, qkv in data.items():  # the references; the first run is also exact's time
                res, ms = timed(
                    lambda qkv=qkv, c=causal: service.attention(*qkv, causal=c), exact_reps
                )
                exact[name] = res.output
                if name == INPUTS[0]:
                    exact_ms = ms
            for method in METHODS:
                if method == "linformer" and causal:
                    continue  # non-causal only, by construction
                opts = options(method, causal)
                row: dict[str, Any] = {"method": method, "causal": causal, "L": n}
                for name, qkv in data.items():
                    if method == "exact":
                        row["ms"], out = exact_ms, exact[name]
                    elif name == INPUTS[0]:
                        res, row["ms"] = timed(
                            lambda qkv=qkv, opts=opts: service.attention(*qkv, **opts), 3
                        )
                        out = res.output
                    else:
                        out = service.attention(*qkv, **opts).output
                    row[f"error {name}"] = rel_error(out, exact[name])
                rows.append(row)
                errors = "  ".join(f"{name}: {row[f'error {name}']:.3g}" for name in INPUTS)
                mode = "causal" if causal else "full  "
                print(f"L={n:6d} {mode} {method:9s} {row['ms']:10.1f} ms  {errors}", flush=True)
    return rows


def crossovers(rows: list[dict[str, Any]]) -> list[str]:
    """Per mode and method: the first L from which it is faster than exact at every longer L."""
    lines = []
    for causal in (False, True):
        exact = {r["L"]: r["ms"] for r in rows if r["method"] == "exact" and r["causal"] == causal}
        for method in METHODS[1:]:
            mine = {r["L"]: r for r in rows if r["method"] == method and r["causal"] == causal}
            if not mine:
                continue
            faster = [n for n in sorted(mine) if mine[n]["ms"] < exact[n]]
            first = next(
                (n for n in sorted(mine) if all(m in faster for m in sorted(mine) if m >= n)),
                None,
            )
            last = max(mine)
            lines.append(
                f"- {'causal' if causal else 'non-causal'} {method}: "
                + (f"faster than exact from L = {first}" if first else "never faster than exact")
                + f"; at L = {last}: {mine[last]['ms']:.0f} ms vs exact {exact[last]:.0f} ms "
                f"({exact[last] / mine[last]['ms']:.1f}x), errors "
                + ", ".join(f"{name} {mine[last][f'error {name}']:.3g}" for name in INPUTS)
            )
    return lines


def write(rows: list[dict[str, Any]], info: dict[str, str]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = {"B": 1, "H": 1, "D": D, "Dv": D, "dtype": "float32", "window": WINDOW}
    (RESULTS / "approx.json").write_text(
        json.dumps({"machine": info, "config": config, "rows": rows}, indent=2)
    )
    lines = [
        "# Approximate attention: time and error against L",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, numpy {info['numpy']}, load average "
        f"{info['load average']} at the end. B = 1, one head, D = Dv = 64, float32, wall time "
        "of `service.attention`, the fastest of 3 runs (exact beyond L = 8192: one run). Error = "
        "||out - exact||_F / ||exact||_F on three inputs: random N(0, 1) q, k, v; the same "
        "with q and k halved; and q = k.",
        "",
        *crossovers(rows),
    ]
    for causal in (False, True):
        methods = [
            m for m in METHODS if any(r["method"] == m and r["causal"] == causal for r in rows)
        ]
        lines += [
            "",
            f"## {'causal' if causal else 'non-causal'}: ms (errors: " + " / ".join(INPUTS) + ")",
            "",
            "| L | " + " | ".join(methods) + " |",
            "|---:|" + "---:|" * len(methods),
        ]
        for n in sorted({r["L"] for r in rows}):
            cells = []
            for m in methods:
                r = next(
                    r for r in rows if r["method"] == m and r["causal"] == causal and r["L"] == n
                )
                err = (
                    "exact"
                    if m == "exact"
                    else " / ".join(f"{r[f'error {name}']:.2g}" for name in INPUTS)
                )
                cells.append(f"{r['ms']:.1f} ({err})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    (RESULTS / "approx.md").write_text("\n".join(lines) + "\n")
    plot(rows, info)


def plot(rows: list[dict[str, Any]], info: dict[str, str]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 9.5), dpi=100)
    ax_t, *ax_err = fig.subplots(2, 2).ravel()
    for method in METHODS:
        for causal, style in ((False, "-o"), (True, "--s")):
            pts = sorted(
                (r["L"], r) for r in rows if r["method"] == method and r["causal"] == causal
            )
            if not pts:
                continue
            xs = [p[0] for p in pts]
            label = f"{method}{' causal' if causal else ''}"
            kw = {"color": STYLE[method], "label": label, "markersize": 4}
            ax_t.plot(xs, [p[1]["ms"] for p in pts], style, **kw)
            if method != "exact":
                for ax, name in zip(ax_err, INPUTS, strict=True):
                    ax.plot(xs, [p[1][f"error {name}"] for p in pts], style, **kw)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("time (ms)")
    ax_t.set_title("time vs L (B=1, H=1, D=64, fp32)")
    for ax, name in zip(ax_err, INPUTS, strict=True):
        ax.set_yscale("log")
        ax.set_ylabel("relative error of the output (Frobenius)")
        ax.set_title(f"error vs exact: {name}")
        ax.axhline(1.0, color="k", lw=0.8, alpha=0.5)  # above 1: worse than answering zeros
    for ax in (ax_t, *ax_err):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length L")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8, ncol=2)
    fig.suptitle(f"exact vs approximate attention: {info['cpu']}, {info['cores']} cores")
    fig.tight_layout()
    fig.savefig(RESULTS / "approx.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="L = 1k .. 4k only")
    parser.add_argument("--max-length", type=int, default=65536, help="longest L (power of 2)")
    args = parser.parse_args()
    top = 4096 if args.quick else args.max_length
    lengths = [1 << p for p in range(10, top.bit_length()) if 1 << p <= top]
    rows = bench(lengths, reps_until=8192)
    info = describe(
        numpy=np.__version__, **{"load average": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    )
    write(rows, info)
    print("\n".join(crossovers(rows)))
    print(f"wrote {RESULTS}/approx.json, approx.md, approx.png")


if __name__ == "__main__":
    main()
