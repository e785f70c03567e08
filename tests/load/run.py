"""`make load`: the real server under 32 locust users for 60 s, and a report of how it held up.

Run as `python -m tests.load.run` (make load). Starts `attention-service` on a free port (as
the tests do: tests.support.http.running_server), warms it up, polls its resident memory
(/proc/<pid>/status VmRSS) while locust runs tests/load/locustfile.py headless, then writes
tests/load/results/last.md (and prints it): p50/p99 latency and throughput per request type,
every status code, 5xx other than deliberate 503s (must be 0), peak RSS. Exits 1 when any
request failed other than by a deliberate 503, or the server died.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.support.http import running_server

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "last.md"
MiB = 1 << 20


class RssPoller(threading.Thread):
    """Samples a process's RSS every `period` seconds; keeps the peak and the last value."""

    def __init__(self, rss: Callable[[], int], period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.rss, self.period = rss, period
        self.peak = self.last = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.last = self.rss()
            except OSError:
                return
            self.peak = max(self.peak, self.last)
            self.stop.wait(self.period)


def percentiles(times: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max of response times in ms."""
    if not times:
        return (float("nan"),) * 3
    p50, p99 = np.percentile(times, [50, 99])
    return float(p50), float(p99), float(max(times))


def report(
    args: argparse.Namespace,
    run: dict[str, Any],
    rss: dict[str, float],
    server_ok: bool,
    server_errors: int,
    loadavg: tuple[str, str],
    wall: float,
) -> tuple[str, bool]:
    status: dict[str, int] = run["status"]
    times: dict[str, list[float]] = run["times"]
    failed: dict[str, int] = run["failed"]
    seconds = run["seconds"]
    responses = sum(len(t) for t in times.values())
    # The locustfile labels a 503 that carries Retry-After (the overload refusal) apart.
    deliberate = sum(n for code, n in status.items() if code.startswith("503 overloaded"))
    unexpected_5xx = sum(n for code, n in status.items() if code[:1] == "5") - deliberate
    transport = sum(n for code, n in status.items() if code.startswith("error"))
    failures = sum(failed.values())
    ok = server_ok and unexpected_5xx == 0 and failures == 0 and transport == 0
    p50, p99, worst = percentiles([t for ts in times.values() for t in ts])
    overrides = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith("ATTN_") and k not in ("ATTN_HEATMAP_DIR", "ATTN_API_KEYS")
    }
    lines = [
        "# Load test (`make load`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {os.cpu_count()} cores "
        f"({platform.machine()}), shared by the server and locust; load average "
        f"{loadavg[0]} before, {loadavg[1]} after (other work on the machine included).",
        f"{args.users} locust users (FastHttpUser, one connection each, 0-50 ms between "
        f"requests) for {args.duration} s against one `attention-service` process with "
        + (
            "the settings " + ", ".join(f"{k}={v}" for k, v in overrides.items())
            if overrides
            else "its default settings (ATTN_MAX_CONCURRENCY = cores, queue 64)"
        )
        + ".",
        "",
        f"**Result: {'PASS' if ok else 'FAIL'}**: {unexpected_5xx} 5xx other than deliberate "
        f"503s ({deliberate} deliberate 503s with Retry-After), {failures} failed requests, "
        f"{transport} transport errors; server {'alive' if server_ok else 'DIED'}, "
        f"{server_errors} tracebacks in its log.",
        "",
        f"- Throughput: **{responses / seconds:.1f} requests/s** ({responses} responses in "
        f"{seconds:.0f} s, PNG fetches included)",
        f"- Latency over all requests: **p50 {p50:.0f} ms, p99 {p99:.0f} ms** (max {worst:.0f} ms)",
        f"- Server resident memory: **peak {rss['peak'] / MiB:.0f} MiB**; "
        f"{rss['start'] / MiB:.0f} MiB after warm-up, {rss['end'] / MiB:.0f} MiB at the end",
        "",
        "| request | count | failures | req/s | p50 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in sorted(times):
        t50, t99, tmax = percentiles(times[name])
        lines.append(
            f"| {name} | {len(times[name])} | {failed.get(name, 0)} | "
            f"{len(times[name]) / seconds:.1f} | {t50:.0f} | {t99:.0f} | {tmax:.0f} |"
        )
    lines += [
        "",
        "Status codes: " + ", ".join(f"{code}: {n}" for code, n in sorted(status.items())),
        "",
        f"Wall time of the run, server start to stop: {wall:.0f} s.",
        "",
    ]
    return "\n".join(lines), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--duration", type=int, default=60, help="seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="attention-load-") as tmp_name:
        tmp = Path(tmp_name)
        env = {"ATTN_ACCESS_LOG": "false", "ATTN_LOG_LEVEL": "warning", "ATTN_API_KEYS": ""}
        env["ATTN_HEATMAP_DIR"] = str(tmp / "heatmaps")
        with running_server(tmp / "server.log", env) as server:
            url = server.url
            # Warm-up: first requests load fonts, caches and code paths.
            small = {"q": [[0.1, 0.2], [0.3, 0.4]], "k": [[0.1, 0.2]], "v": [[1.0]]}
            for _ in range(3):
                httpx.post(url + "/v1/attention", json={**small, "heatmap": True}, timeout=30)
            rss_start = server.rss()
            poller = RssPoller(server.rss)
            poller.start()
            status_file = tmp / "status.json"
            cmd = [
                str(Path(sys.executable).with_name("locust")),
                "-f",
                str(HERE / "locustfile.py"),
                "--headless",
                "--users",
                str(args.users),
                "--spawn-rate",
                str(args.users),
                "--run-time",
                f"{args.duration}s",
                "--host",
                url,
                "--only-summary",
                "--loglevel",
                "WARNING",
            ]
            env = {**os.environ, "LOAD_STATUS_FILE": str(status_file)}
            # locust exits 1 when any request failed; the report says which and why.
            subprocess.run(cmd, env=env, timeout=args.duration + 120, check=False)
            poller.stop.set()
            poller.join()
            rss = {"start": rss_start, "peak": poller.peak, "end": server.rss()}
            server_ok = server.proc.poll() is None
            if not status_file.exists():
                raise SystemExit("locust wrote no results (see its output above)")
            run = json.loads(status_file.read_text())
        log = (tmp / "server.log").read_text(errors="replace")
        server_errors = log.count("Traceback")
        if server_errors:
            print(log[-5000:], file=sys.stderr)
    loadavg = (f"{load_before:.1f}", f"{os.getloadavg()[0]:.1f}")
    text, ok = report(args, run, rss, server_ok, server_errors, loadavg, time.monotonic() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"(written to {args.out})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
