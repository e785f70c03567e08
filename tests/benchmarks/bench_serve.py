"""Ray Serve against uvicorn: requests/s of the same request under the same load generator.

The request is bench_http's b64 one (POST /v1/attention, q, k, v of 128x64 float32 as b64
tensors); the load generator is wrk with 8 connections. Two pairings, each run side by side in
interleaved rounds (both servers up, one driven at a time): `attention-service --workers 1`
against `attention-service ray --replicas 1`, and `--workers 2` against `--replicas 2`, the Ray
cluster local with 2 CPUs. Ray Serve adds a proxy hop (HTTP proxy actor -> replica over Ray's
RPC) to every request; the figures show what it costs here.

    .venv/bin/python -m tests.benchmarks.bench_serve [--quick] [--duration 10] [--rounds 3]

Writes tests/benchmarks/results/serve.json and serve.md (`make bench-serve`). Needs wrk.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.benchmarks.bench_http import _LUA, CONNECTIONS, Server, _bodies, _free_port, _wrk
from tests.benchmarks.machine import describe, report, table, write_results

RESULTS = Path(__file__).resolve().parent / "results"


class RayServer(Server):
    """`attention-service ray` in a child process (its own local cluster); stopped by its pid."""

    stop_signal = signal.SIGINT  # the launcher removes the deployment, then stops Ray
    stop_grace_s = 60.0

    def __init__(self, port: int, replicas: int, heatmap_dir: Path) -> None:
        script = Path(sys.executable).parent / "attention-service"
        env = {
            **os.environ,
            "ATTN_HEATMAP_DIR": str(heatmap_dir),
            "ATTN_LOG_LEVEL": "warning",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        cmd = [str(script), "ray", "--port", str(port), "--replicas", str(replicas),
               "--num-cpus", "2"]  # fmt: skip
        self._start(cmd, env, 300)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, one round")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.duration, args.rounds = 3.0, 1

    import ray

    pairings: dict[int, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        body = _bodies(work)["b64"]
        script = work / "b64.lua"
        script.write_text(_LUA.format(body=body))
        for n in (1, 2):
            flags = ["--workers", str(n), "--no-access-log"]
            uvicorn = Server(_free_port(), work / "uvicorn", flags, {})
            serve = RayServer(_free_port(), n, work / "ray")
            runs: dict[str, list[dict[str, Any]]] = {"uvicorn": [], "ray": []}
            try:
                for server in (uvicorn, serve):
                    assert server.check("/v1/attention", body) == 200
                    _wrk(server.url + "/v1/attention", script, 2, args.threads)  # warm-up
                for r in range(args.rounds):
                    for name, server in (("uvicorn", uvicorn), ("ray", serve)):
                        load = float(Path("/proc/loadavg").read_text().split()[0])
                        url = server.url + "/v1/attention"
                        run = _wrk(url, script, args.duration, args.threads)
                        run["load"] = load
                        runs[name].append(run)
                        print(
                            f"{n} x {name:7s} round {r}: {run['rps']:7.1f} req/s  p50 "
                            f"{run['p50_ms']} ms  p99 {run['p99_ms']} ms  non-2xx "
                            f"{run['non_2xx']}  load {load}",
                            flush=True,
                        )
            finally:
                uvicorn.stop()
                serve.stop()
            pairings[n] = runs

    summary = []
    for n, runs in pairings.items():
        row: dict[str, Any] = {"processes": n}
        for name, rs in runs.items():
            row[name] = {
                "rps_median": statistics.median(x["rps"] for x in rs),
                "p50_ms_median": statistics.median(x["p50_ms"] for x in rs),
                "p99_ms_median": statistics.median(x["p99_ms"] for x in rs),
                "non_2xx": sum(x["non_2xx"] for x in rs),
            }
        row["ray_over_uvicorn"] = row["ray"]["rps_median"] / row["uvicorn"]["rps_median"]
        summary.append(row)
    loads = [x["load"] for runs in pairings.values() for rs in runs.values() for x in rs]
    result = {
        "machine": describe(ray=ray.__version__),
        "request": "POST /v1/attention, q, k, v 128x64 float32 as b64",
        "load_generator": f"wrk, {CONNECTIONS} connections, {args.threads} threads, "
        f"{args.duration:g} s per run",
        "rounds": args.rounds,
        "summary": summary,
        "runs": {str(n): runs for n, runs in pairings.items()},
        "load_1min": [min(loads), max(loads)],
    }
    write_results(args.out, "serve", result, _markdown(result))


SERVE_COLUMNS = (
    "processes", "uvicorn req/s", "Ray Serve req/s", "Ray / uvicorn", "uvicorn p50 / p99 (ms)",
    "Ray Serve p50 / p99 (ms)", "errors",
)  # fmt: skip


def _serve_row(row: dict[str, Any]) -> list[str]:
    u, s = row["uvicorn"], row["ray"]
    return [
        str(row["processes"]),
        f"{u['rps_median']:.0f}",
        f"{s['rps_median']:.0f}",
        f"{row['ray_over_uvicorn']:.2f}",
        f"{u['p50_ms_median']:.1f} / {u['p99_ms_median']:.1f}",
        f"{s['p50_ms_median']:.1f} / {s['p99_ms_median']:.1f}",
        str(u["non_2xx"] + s["non_2xx"]),
    ]


def _markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    return report(
        "Ray Serve against uvicorn",
        f"{m['cpu']}, {m['cores']} cores; Ray {m['ray']} (local cluster, 2 CPUs). "
        f"{r['request']}; {r['load_generator']}; median of {r['rounds']} interleaved rounds; "
        f"load average {r['load_1min'][0]:.1f}-{r['load_1min'][1]:.1f} (shared machine: "
        "provisional).",
        table(SERVE_COLUMNS, "rrrrrrr", map(_serve_row, r["summary"])),
    )


if __name__ == "__main__":
    main()
