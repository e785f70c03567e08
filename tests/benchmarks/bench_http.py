"""HTTP benchmark: requests/s through the real server, and the heatmap render time.

Starts `attention-service` twice (one worker process each, free ports): with the defaults, where
a small request is parsed and computed on the event loop, and with ATTN_INLINE_MAX_BYTES=0, where
every request hops to a worker thread as before that path existed. wrk (8 connections) drives
GET /healthz as the baseline, then POST /v1/attention with q, k, v of 128x64 float32 as nested
JSON lists and as b64 tensors on both servers, interleaved in rounds so that every side sees the
same machine load; the two are printed side by side. Beside requests/s it
reports the server's CPU time per request (utime + stime of the server process from
/proc/<pid>/stat, before and after each run), a figure that depends much less than requests/s
on what else the machine runs. The 512x512 heatmap (with colorbar) and the 8-head 16x16-token
image set (the /v1/tokens default) are timed in-process; POST /v1/tokens with those defaults is
timed through the server, one request at a time, as the web viewer sends it.

Writes tests/benchmarks/results/http.json, http.md and sample PNGs. Exits 1 if any request
was answered with an error. Needs wrk (Debian: apt-get install wrk).

    .venv/bin/python -m tests.benchmarks.bench_http [--quick] [--duration 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from tests.benchmarks.machine import cpu_model, report, table, write_results

RESULTS = Path(__file__).resolve().parent / "results"

GOALS = {
    "list_rps": 400.0,
    "b64_rps": 800.0,
    "list_cpu_ms": 2.5,
    "b64_cpu_ms": 1.0,
    "heatmap_ms": 60.0,
    "grid12_ms": 60.0,
    "tokens_request_ms": 150.0,
}
# The two servers: the defaults (small requests answered on the event loop) and every request
# through a worker thread, as before the inline path (ATTN_INLINE_MAX_BYTES=0).
CONFIGS = {"inline": {}, "thread": {"ATTN_INLINE_MAX_BYTES": "0"}}
CONNECTIONS = 8
SHAPE = (128, 64)

_LUA = """
local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat_cpu(path: Path) -> float:
    fields = path.read_text().rsplit(")", 1)[1].split()
    # Fields after the ")" start at field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime + stime of the whole process, of its main thread: the event loop), in seconds."""
    return _stat_cpu(Path(f"/proc/{pid}/stat")), _stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat"))


def _bodies(directory: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))

    def b64(a: np.ndarray) -> dict[str, Any]:
        raw = base64.b64encode(a.astype("<f4").tobytes()).decode()
        return {"dtype": "float32", "shape": list(a.shape), "b64": raw}

    # Nested lists as a Python client writes them (json of float32 -> float64 reprs).
    bodies = {
        "list": {"q": q.tolist(), "k": k.tolist(), "v": v.tolist()},
        "b64": {"q": b64(q), "k": b64(k), "v": b64(v)},
    }
    paths = {}
    for name, body in bodies.items():
        path = directory / f"{name}.json"
        path.write_text(json.dumps(body))
        paths[name] = path
    return paths


class Server:
    """The console script in a child process; stopped (by its own pid) on exit."""

    # How stop() asks the server to end, and how long it waits before killing it.
    stop_signal = signal.SIGTERM
    stop_grace_s = 10.0

    def __init__(
        self, port: int, heatmap_dir: Path, extra_args: list[str], env: dict[str, str]
    ) -> None:
        script = Path(sys.executable).parent / "attention-service"
        env = {**os.environ, "ATTN_HEATMAP_DIR": str(heatmap_dir), **env}
        self._start([str(script), "--port", str(port), "--workers", "1", *extra_args], env, 60)

    def _start(self, cmd: list[str], env: dict[str, str], ready_timeout_s: float) -> None:
        """Run cmd (its --port in self.url) and wait until /readyz answers 200."""
        self.url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited:\n{self.log.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server not ready after {ready_timeout_s:.0f} s")
            time.sleep(0.2)

    def check(self, path: str, body: Path | None) -> int:
        """One request with urllib: the benchmark must measure 200s, not errors."""
        data = body.read_bytes() if body else None
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status

    def stop(self) -> None:
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(self.stop_grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _key(config: str, name: str) -> str:
    return name if config == "inline" else f"{name} ({config})"


def _wrk(url: str, script: Path | None, duration: float, threads: int) -> dict[str, Any]:
    cmd = ["wrk", f"-t{threads}", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--latency"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)

    def ms(m: re.Match[str] | None) -> float | None:
        if m is None:
            return None
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    return {
        "requests": requests,
        "rps": rps,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else None,
        "p50_ms": ms(p50),
        "p99_ms": ms(p99),
    }


def bench_http(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, float]]:
    bodies = _bodies(work)
    scripts: dict[str, Path | None] = {"healthz": None}
    for name, body in bodies.items():
        scripts[name] = work / f"{name}.lua"
        scripts[name].write_text(_LUA.format(body=body))
    paths = {"healthz": "/healthz", "list": "/v1/attention", "b64": "/v1/attention"}
    # The service's own defaults (log level info, access log on) unless --no-access-log.
    extra = ["--access-log"] if args.access_log else ["--no-access-log"]
    servers = {
        config: Server(_free_port(), work / f"heatmaps-{config}", extra, env)
        for config, env in CONFIGS.items()
    }
    # (config, request): the baseline is measured with the defaults only.
    cases = [("inline", "healthz")] + [(c, n) for n in bodies for c in CONFIGS]
    runs: dict[str, list[dict[str, Any]]] = {_key(c, n): [] for c, n in cases}
    try:
        for config, name in cases:
            body = bodies.get(name)
            assert servers[config].check(paths[name], body) == 200, (config, name)
            # Warm-up: the first requests pay imports and caches.
            _wrk(servers[config].url + paths[name], scripts[name], 1, args.threads)
        for _ in range(args.rounds):
            for config, name in cases:
                server = servers[config]
                before = _cpu_seconds(server.proc.pid)
                load = Path("/proc/loadavg").read_text().split()[0]
                run = _wrk(server.url + paths[name], scripts[name], args.duration, args.threads)
                after = _cpu_seconds(server.proc.pid)
                count = max(run["requests"], 1)
                run["server_cpu_ms_per_request"] = 1e3 * (after[0] - before[0]) / count
                run["event_loop_cpu_ms_per_request"] = 1e3 * (after[1] - before[1]) / count
                run["loadavg_1min_before"] = float(load)
                runs[_key(config, name)].append(run)
                print(
                    f"{_key(config, name):14s} {run['rps']:8.1f} req/s  server CPU "
                    f"{run['server_cpu_ms_per_request']:.3f} ms/req (event loop "
                    f"{run['event_loop_cpu_ms_per_request']:.3f})  p50 {run['p50_ms']} ms  "
                    f"non-2xx {run['non_2xx']}  load {load}",
                    flush=True,
                )
        tokens = bench_tokens_request(servers["inline"].url, 3 if args.quick else 10)
    finally:
        for server in servers.values():
            server.stop()
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "rps_best": max(r["rps"] for r in rs),
            "rps_median": statistics.median(r["rps"] for r in rs),
            "server_cpu_ms_per_request_median": statistics.median(
                r["server_cpu_ms_per_request"] for r in rs
            ),
            "server_cpu_ms_per_request_min": min(r["server_cpu_ms_per_request"] for r in rs),
            "event_loop_cpu_ms_per_request_median": statistics.median(
                r["event_loop_cpu_ms_per_request"] for r in rs
            ),
            "non_2xx": sum(r["non_2xx"] for r in rs),
            "socket_errors": [r["socket_errors"] for r in rs if r["socket_errors"]],
            "runs": rs,
        }
    return summary, tokens


def _time_ms(fn: Any, repeat: int) -> dict[str, float]:
    """Median and best wall time, and median CPU time of this thread (load-independent)."""
    fn(0)  # the first call builds the thread's figure
    wall, cpu = [], []
    for i in range(1, repeat + 1):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn(i)
        cpu.append(1e3 * (time.thread_time() - start_cpu))
        wall.append(1e3 * (time.perf_counter() - start))
    return {
        "median_ms": statistics.median(wall),
        "min_ms": min(wall),
        "cpu_median_ms": statistics.median(cpu),
    }


def _softmax(scores: np.ndarray) -> np.ndarray:
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def bench_heatmaps(repeat: int, out_dir: Path) -> dict[str, Any]:
    from service.render.canvas import render_grid, render_map
    from service.render.views import render_weights

    rng = np.random.default_rng(0)
    # Each call draws a different map (another colour scale, so the colorbar is redrawn).
    maps = [
        _softmax(rng.standard_normal((512, 512)).astype(np.float32) * (2 + i % 5)) for i in range(8)
    ]

    def warm(i: int) -> bytes:  # same shape and labels as the call before: the frame is kept
        return render_map(maps[i % 8], title=f"attention, batch 0, head {i}")

    def cold(i: int) -> bytes:  # a new axis label every call: the whole figure is drawn
        return render_map(maps[i % 8], title=f"attention, batch 0, head {i}", ylabel=f"query {i}")

    (out_dir / "http_heatmap_512.png").write_bytes(warm(0))
    kept = _time_ms(warm, repeat)
    drawn = _time_ms(cold, repeat)

    # The /v1/tokens default: 8 heads of 16x16 tokens, every head + mean + grid (10 images).
    w8 = _softmax(rng.standard_normal((1, 8, 16, 16)).astype(np.float32) * 2)
    tokens = [f"tok{i}" for i in range(16)]

    def heads8(i: int) -> list[Any]:
        return render_weights(w8, batch=0, heads="all", tokens=tokens, title=f"attention {i}")

    images = heads8(0)
    (out_dir / "http_heatmap_16_tokens.png").write_bytes(images[0].png)
    (out_dir / "http_heatmap_16_tokens_grid.png").write_bytes(images[-1].png)
    eight = _time_ms(heads8, max(3, repeat // 4))

    # The grid of 12 heads (MiniLM's) of 16x16 tokens, one image.
    w12 = _softmax(rng.standard_normal((12, 16, 16)).astype(np.float32) * 2)
    names = [f"head {h}" for h in range(12)]

    def grid12(i: int) -> bytes:
        return render_grid(w12, names, title=f"attention {i}")

    (out_dir / "http_grid_12_heads.png").write_bytes(grid12(0))
    return {
        "map_512_frame_kept": kept,
        "map_512_frame_drawn": drawn,
        "heads8_tokens16": {**eight, "images": len(images)},
        "grid12_tokens16": _time_ms(grid12, repeat),
    }


def bench_tokens_request(server_url: str, repeat: int) -> dict[str, float]:
    """POST /v1/tokens with 16 tokens and every default (8 heads, heatmaps of every head, their
    mean, the grid and the positional encoding), one request at a time, as the viewer sends."""
    text = " ".join(f"word{i}" for i in range(16)).encode()
    body = b'{"text": "' + text + b'"}'
    times = []
    for _ in range(repeat + 1):
        req = urllib.request.Request(
            server_url + "/v1/tokens", data=body, headers={"Content-Type": "application/json"}
        )
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=60) as r:
            data = json.loads(r.read())
        times.append(1e3 * (time.perf_counter() - start))
    return {
        "median_ms": statistics.median(times[1:]),
        "min_ms": min(times[1:]),
        "images": len(data["heatmaps"]) + (data.get("positional_encoding") is not None),
    }


REQUEST_COLUMNS = (
    "request", "req/s (best)", "req/s (median)", "server CPU ms/req, median (min)",
    "of which event loop", "goal req/s", "best/goal", "goal CPU ms", "goal/CPU",
)  # fmt: skip
REQUEST_LABELS = {
    "healthz": "GET /healthz (baseline)",
    "list": "POST /v1/attention, nested lists",
    "b64": "POST /v1/attention, b64",
}
HEATMAP_COLUMNS = (
    "heatmap (in-process)", "median ms", "min ms", "CPU ms (median)", "goal ms", "goal/median",
)  # fmt: skip


def _request_row(key: str, s: dict[str, Any]) -> list[str]:
    name, _, config = key.partition(" ")
    rps_goal, cpu_goal = GOALS.get(f"{name}_rps"), GOALS.get(f"{name}_cpu_ms")
    cpu = s["server_cpu_ms_per_request_median"]
    cells = [
        REQUEST_LABELS[name] + (f", worker thread {config}" if config else ""),
        f"{s['rps_best']:.0f}",
        f"{s['rps_median']:.0f}",
        f"{cpu:.3f} ({s['server_cpu_ms_per_request_min']:.3f})",
        f"{s['event_loop_cpu_ms_per_request_median']:.3f}",
    ]
    cells += [f"{rps_goal:.0f}", f"{s['rps_best'] / rps_goal:.2f}"] if rps_goal else ["-", "-"]
    cells += [f"{cpu_goal:.1f}", f"{cpu_goal / cpu:.2f}"] if cpu_goal else ["-", "-"]
    return cells


def _heatmap_row(label: str, r: dict[str, Any], goal: float | None) -> list[str]:
    cells = [label, f"{r['median_ms']:.1f}", f"{r['min_ms']:.1f}", f"{r['cpu_median_ms']:.1f}"]
    return cells + ([f"{goal:.0f}", f"{goal / r['median_ms']:.2f}"] if goal else ["-", "-"])


def _markdown(result: dict[str, Any]) -> str:
    h, m = result["http"], result["heatmaps"]
    inline_vs_thread = []
    for name in ("list", "b64"):
        inline, thread = h[name], h[_key("thread", name)]
        cpu_ratio = (
            inline["server_cpu_ms_per_request_median"] / thread["server_cpu_ms_per_request_median"]
        )
        inline_vs_thread.append(
            f"{REQUEST_LABELS[name]}: inline / worker thread, side by side: req/s (median) "
            f"{inline['rps_median'] / thread['rps_median']:.2f}x, server CPU per request "
            f"{cpu_ratio:.2f}x."
        )
    heatmaps = [
        (
            "512x512 with colorbar, whole figure drawn",
            m["map_512_frame_drawn"],
            GOALS["heatmap_ms"],
        ),
        (
            "512x512 with colorbar, frame kept (next head)",
            m["map_512_frame_kept"],
            GOALS["heatmap_ms"],
        ),
        (
            f"8 heads x 16x16 tokens, {m['heads8_tokens16']['images']} images",
            m["heads8_tokens16"],
            None,
        ),
        ("grid of 12 heads x 16x16 tokens, one image", m["grid12_tokens16"], GOALS["grid12_ms"]),
    ]
    t = result["tokens_request_16_tokens"]
    return report(
        "HTTP benchmark",
        f"Machine: {result['machine']}; load average before/after: "
        f"{result['loadavg_before']} / {result['loadavg_after']}.\n"
        f"Command: `{result['command']}`; wrk -t{result['wrk_threads']} -c{CONNECTIONS} "
        f"-d{result['duration_s']:g}s, {result['rounds']} interleaved rounds; access log "
        f"{'on' if result['access_log'] else 'off'}.",
        table(REQUEST_COLUMNS, "lrrrrrrrr", (_request_row(k, s) for k, s in h.items())),
        *inline_vs_thread,
        "Server CPU per request: every thread of the server process (event loop, compute "
        "workers, native kernel), from /proc; the event loop's share beside it. Most of it runs "
        "under the GIL, one thread at a time, so one worker process answers at most about "
        "1000 / (server CPU ms) requests/s however many cores are idle; requests/s also fall "
        "with whatever else the machine runs (see the load average).",
        table(HEATMAP_COLUMNS, "lrrrrr", (_heatmap_row(*row) for row in heatmaps)),
        f"POST /v1/tokens, 16 tokens, defaults ({t['images']} images: 8 heads, mean, grid, "
        f"positional encoding), one request at a time through the server: median "
        f"{t['median_ms']:.0f} ms, best {t['min_ms']:.0f} ms; goal "
        f"{GOALS['tokens_request_ms']:.0f} ms (goal/median "
        f"{GOALS['tokens_request_ms'] / t['median_ms']:.2f}).",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per request kind")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server's access log (default on, as the service's own default)",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.duration, args.rounds = 2.0, 1
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install -y wrk")
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        http, tokens = bench_http(args, Path(tmp))
    heat = bench_heatmaps(5 if args.quick else 20, args.out)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": " ".join(["python", "-m", "tests.benchmarks.bench_http", *sys.argv[1:]]),
        "loadavg_before": " ".join(load_before),
        "loadavg_after": " ".join(load_after),
        "wrk_threads": args.threads,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "access_log": args.access_log,
        "goals": GOALS,
        "http": http,
        "heatmaps": heat,
        "tokens_request_16_tokens": tokens,
        "ratios": {
            "list_inline_over_thread_cpu": http["list"]["server_cpu_ms_per_request_median"]
            / http[_key("thread", "list")]["server_cpu_ms_per_request_median"],
            "b64_inline_over_thread_cpu": http["b64"]["server_cpu_ms_per_request_median"]
            / http[_key("thread", "b64")]["server_cpu_ms_per_request_median"],
            "list_rps_best_over_goal": http["list"]["rps_best"] / GOALS["list_rps"],
            "b64_rps_best_over_goal": http["b64"]["rps_best"] / GOALS["b64_rps"],
            "heatmap_goal_over_median_frame_drawn": GOALS["heatmap_ms"]
            / heat["map_512_frame_drawn"]["median_ms"],
            "heatmap_goal_over_median_frame_kept": GOALS["heatmap_ms"]
            / heat["map_512_frame_kept"]["median_ms"],
        },
    }
    write_results(args.out, "http", result, _markdown(result))
    failed = {n: s["non_2xx"] for n, s in http.items() if s["non_2xx"] or s["socket_errors"]}
    if failed:
        raise SystemExit(f"error answers or socket errors during the runs: {failed}")


if __name__ == "__main__":
    main()
