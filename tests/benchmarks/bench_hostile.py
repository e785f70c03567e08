"""Hostile-input figures: how fast each class of issue 14 is refused, what memory it leaves, how
soon a timed-out request frees its slot. The README's reliability section quotes them.

Starts the real server as tests/web/test_hostile.py does (its settings), sends each class's
requests of that file's table PASSES times and reports, per class, the requests, their slowest
and median answer times and the server's resident memory after the whole run against a baseline
taken after two warm-up passes. Then, on a server whose requests time out after 1 s, each heavy
request of that file (the performer's set-up, exact attention in the native kernel): when its
504 came and when its slot was free again, with the client waiting and with the client leaving.

Writes tests/benchmarks/results/hostile.md. Timings, so not a test: exits 1 only when an
answer differs from the table's status.

    .venv/bin/python -m tests.benchmarks.bench_hostile [--passes 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmarks.machine import cpu_model
from tests.support.http import running_server
from tests.web import test_hostile as hostile

MiB = 1 << 20
RESULTS = Path(__file__).parent / "results" / "hostile.md"


def refusals(passes: int, tmp: Path) -> tuple[list[str], bool]:
    env = {**hostile.SERVER_ENV, "ATTN_HEATMAP_DIR": str(tmp / "heatmaps")}
    classes = {"older table": {}, **hostile.CLASSES}
    in_class = {name for cases in hostile.CLASSES.values() for name in cases}
    classes["older table"] = {n: c for n, c in hostile.HOSTILE.items() if n not in in_class}
    ok = True
    times: dict[str, list[tuple[float, str]]] = {name: [] for name in classes}
    with running_server(tmp / "refusals.log", env, *hostile.SERVER_ARGS) as srv:
        for _ in range(2):  # warm-up, as the memory test does
            for spec, _ in hostile.HOSTILE.values():
                hostile.send(srv, spec)
        baseline = srv.rss()
        for _ in range(passes):
            for group, cases in classes.items():
                for name, (spec, status) in cases.items():
                    start = time.monotonic()
                    got = hostile.send(srv, spec)[0]
                    times[group].append((time.monotonic() - start, name))
                    if got != status:
                        print(f"{name}: {got}, expected {status}", file=sys.stderr)
                        ok = False
        grown = srv.rss() - baseline
        alive = srv.proc.poll() is None
    lines = ["| class | requests | median answer | slowest (which) |", "|---|---:|---:|---|"]
    for group, answers in times.items():
        slowest, which = max(answers)
        median = statistics.median(seconds for seconds, _ in answers)
        lines.append(
            f"| {group} | {len(answers)} | {median * 1000:.0f} ms"
            f" | {slowest * 1000:.0f} ms ({which}) |"
        )
    lines.append(
        f"\nServer RSS {baseline / MiB:.0f} MiB after warm-up, {grown / MiB:+.1f} MiB after"
        f" {passes} more passes of all {len(hostile.HOSTILE)} requests; process alive: {alive}."
    )
    return lines, ok


def timeouts(tmp: Path) -> list[str]:
    env = {
        "ATTN_HEATMAP_DIR": str(tmp / "heatmaps"),
        "ATTN_REQUEST_TIMEOUT_S": "1",
        "ATTN_MAX_CONCURRENCY": "1",
    }
    lines = [
        "\n| heavy request (ATTN_REQUEST_TIMEOUT_S=1) | client | answer | slot free after |",
        "|---|---|---|---:|",
    ]
    with running_server(tmp / "timeouts.log", env, *hostile.SERVER_ARGS) as srv:
        for name, make in hostile.HEAVY.items():
            body = make()
            for leave in (False, True):
                start = time.monotonic()
                try:
                    timeout = 0.5 if leave else 30
                    answer = str(
                        hostile.request(srv, "POST", "/v1/attention", body, timeout=timeout)[0]
                    )
                except OSError:  # the client left
                    answer = "none (left)"
                answered = time.monotonic() - start
                while hostile._running(srv):
                    time.sleep(0.02)
                free = time.monotonic() - start
                who = "leaves at 0.5 s" if leave else "waits"
                lines.append(f"| {name} | {who} | {answer} at {answered:.2f} s | {free:.2f} s |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lines, ok = refusals(args.passes, Path(tmp))
        lines += timeouts(Path(tmp))
    text = f"Machine: {cpu_model()}\n\n" + "\n".join(lines) + "\n"
    RESULTS.write_text(text)
    print(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
