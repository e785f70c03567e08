"""Overload: 503 at once beyond the queue, 504 past ATTN_REQUEST_TIMEOUT_S, and the work of a
client that went away is dropped (queued: never runs; running: stops at its next checkpoint).

The in-process tests use httpx's ASGITransport; disconnects and the 503 latency need real
sockets, so those run against uvicorn serving the app on a free port (in a thread of this
process, which lets the tests hold the scheduler and read its state).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
from fastapi import FastAPI

import service
from service.core.cancel import Cancelled, checkpoint
from service.web.app import create_app
from service.web.problems import ClientClosed, ComputeTimeout
from service.web.scheduler import Scheduler
from service.web.v1 import attention as attention_route
from service.web.v1 import multihead as multihead_route
from tests.support.http import app_settings, assert_problem

SMALL = {
    "q": [[1.0, 0.0], [0.0, 1.0]],
    "k": [[1.0, 0.0], [0.0, 1.0]],
    "v": [[1.0, 2.0], [3.0, 4.0]],
}
SMALL_V2 = {
    "inputs": [
        {"name": n, "shape": [2, 2], "datatype": "FP32", "data": [1, 0, 0, 1]}
        for n in ("q", "k", "v")
    ]
}
HEATMAP = {**SMALL, "heatmap": True}


def _sample(app: FastAPI, name: str, **labels: str) -> float:
    value = app.state.services.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def _ran(app: FastAPI, job: str) -> float:
    """How many jobs of this kind a compute worker started."""
    return _sample(app, "attention_compute_seconds_count", job=job)


def _abandoned(app: FastAPI, job: str, reason: str) -> float:
    return _sample(app, "attention_compute_abandoned_total", job=job, reason=reason)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting until {what}")
        time.sleep(0.005)


def _hold(
    monkeypatch: pytest.MonkeyPatch,
    route: Any,
    name: str,
    gate: threading.Event,
    started: threading.Event | None = None,
    timeout: float = 30,
) -> None:
    """Make the core function a route calls (`route.name`) wait for `gate` before computing,
    after setting `started`: a long computation, under the test's control."""
    real = getattr(route, name)

    def held(*args: Any, **kwargs: Any) -> Any:
        if started is not None:
            started.set()
        gate.wait(timeout=timeout)
        return real(*args, **kwargs)

    monkeypatch.setattr(route, name, held)


def _pngs(directory: Path) -> list[Path]:
    return list(directory.glob("*.png")) if directory.exists() else []


# ---------------------------------------------------------------------------------------------
# A real server in a thread


class LiveServer:
    """uvicorn (httptools, as in production) serving `app` on a free port of 127.0.0.1."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.scheduler: Scheduler = app.state.services.scheduler
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, http="httptools", log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve())

    def __enter__(self) -> LiveServer:
        self.thread.start()
        _wait_until(lambda: self.server.started, "the server started", timeout=60)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def hold(self, gate: threading.Event) -> Future[Any]:
        """Occupy one compute slot (on the server's loop) until gate is set."""
        held = asyncio.run_coroutine_threadsafe(
            self.scheduler.run("hold", gate.wait, timeout_s=math.inf), self.loop
        )
        _wait_until(lambda: self.scheduler.running >= 1, "the hold job runs")
        return held

    def send_raw(self, path: str, body: bytes) -> socket.socket:
        """A complete POST on a socket of its own (closed by the caller: a disconnect)."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        return sock


# ---------------------------------------------------------------------------------------------
# 503 beyond the queue, under real load


@contextlib.contextmanager
def _cpu_burner(threads: int = 2) -> Iterator[None]:
    """Keep the cores busy with the native kernel (which runs without the GIL, as in a job)."""
    stop = threading.Event()
    q = np.random.default_rng(1).standard_normal((1, 4, 1024, 64)).astype(np.float32)

    def burn() -> None:
        while not stop.is_set():
            service.attention(q, q, q, num_threads=1)

    workers = [threading.Thread(target=burn) for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        stop.set()
        for w in workers:
            w.join()


def test_excess_requests_get_503_at_once_while_accepted_ones_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(app_settings(tmp_path, max_concurrency=1, queue_size=1, retry_after_s=2))
    gate = threading.Event()
    # The accepted requests keep their slots until the refusals have been measured.
    _hold(monkeypatch, multihead_route, "multihead_attention", gate, timeout=60)
    x = np.random.default_rng(0).standard_normal((2, 96, 32)).astype(np.float32)
    accepted_body = {"query": x.tolist(), "num_heads": 4, "seed": 3}
    with (
        LiveServer(app) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as http,
        ThreadPoolExecutor(2) as clients,
    ):
        accepted = []
        for n in (1, 2):  # one runs, one waits in the queue
            accepted.append(clients.submit(http.post, "/v1/multihead", json=accepted_body))
            _wait_until(
                lambda n=n: srv.scheduler.running + srv.scheduler.queued == n,
                "the accepted requests are admitted",
            )
        latencies = []
        with _cpu_burner():  # refused while both cores compute
            for i in range(12):
                v2 = i % 2 == 1
                start = time.perf_counter()
                if v2:
                    r = http.post("/v2/models/attention/infer", content=orjson.dumps(SMALL_V2))
                else:
                    r = http.post("/v1/attention", json=SMALL)
                latencies.append(time.perf_counter() - start)
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "2"
                if v2:
                    assert "ATTN_MAX_CONCURRENCY" in r.json()["error"]
                else:
                    assert_problem(r, 503)
        gate.set()
        results = [f.result() for f in accepted]
    median = statistics.median(latencies)
    print(
        f"\n503 latency over {len(latencies)} requests, cores busy: median "
        f"{median * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms"
    )
    # The issue asks for 50 ms; the bound here is looser for a shared, loaded test machine.
    assert median < 0.25
    expected = service.multihead_attention(x, num_heads=4, seed=3).output
    for r in results:
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["output"], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# A client that goes away


@pytest.mark.parametrize(
    ("path", "body", "job"),
    [
        ("/v1/attention", orjson.dumps(SMALL), "attention"),
        ("/v2/models/attention/infer", orjson.dumps(SMALL_V2), "v2-attention"),
    ],
    ids=["v1", "v2"],
)
def test_a_queued_request_whose_client_left_never_runs(
    tmp_path: Path, path: str, body: bytes, job: str
) -> None:
    # inline_max_bytes=0: the small /v1 request queues instead of being answered on the loop.
    app = create_app(app_settings(tmp_path, max_concurrency=1, queue_size=4, inline_max_bytes=0))
    gate = threading.Event()
    with LiveServer(app) as srv:
        held = srv.hold(gate)
        try:
            sock = srv.send_raw(path, body)
            _wait_until(lambda: srv.scheduler.queued == 1, "the request is queued")
            sock.close()
            # Taken off the queue as soon as the server sees the disconnect, while the slot
            # it waited for is still busy.
            _wait_until(lambda: srv.scheduler.queued == 0, "the queued job is dropped")
            assert _abandoned(app, job, "disconnect") == 1
            assert srv.scheduler.running == 1
        finally:
            gate.set()
            held.result(timeout=30)
        _wait_until(lambda: srv.scheduler.running == 0, "the hold job ends")
        assert _ran(app, job) == 0
        # The same request from a client that stays gets its answer (and is counted).
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            ctype = {"content-type": "application/json"}
            assert http.post(path, content=body, headers=ctype).status_code == 200
        assert _ran(app, job) == 1


def test_a_running_request_whose_client_left_stops_at_its_next_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(app_settings(tmp_path, max_concurrency=1, queue_size=4))
    store_dir = tmp_path / "heatmaps"
    started, gate = threading.Event(), threading.Event()
    # A long computation: the job is running when the client leaves.
    _hold(monkeypatch, attention_route, "attention", gate, started)
    with LiveServer(app) as srv:
        sock = srv.send_raw("/v1/attention", orjson.dumps(HEATMAP))
        assert started.wait(timeout=20)
        sock.close()
        _wait_until(lambda: _abandoned(app, "attention", "disconnect") == 1, "abandoned")
        # The thread is still busy, so its slot is still counted: no core is promised twice.
        assert srv.scheduler.running == 1
        gate.set()
        _wait_until(lambda: srv.scheduler.running == 0, "the job stops")
        # It stopped before the kernel and before drawing: no image was stored.
        assert _pngs(store_dir) == []
        # Control: the same request, waited for, draws and stores its images.
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            r = http.post("/v1/attention", json=HEATMAP)
        assert r.status_code == 200 and r.json()["heatmaps"]
        assert len(_pngs(store_dir)) == len(r.json()["heatmaps"])


# ---------------------------------------------------------------------------------------------
# ATTN_REQUEST_TIMEOUT_S: 504


async def _asgi(app: FastAPI, scenario: Callable[[httpx.AsyncClient], Any]) -> Any:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            return await scenario(ac)


def test_a_request_queued_past_the_timeout_is_504_and_never_runs(tmp_path: Path) -> None:
    app = create_app(
        app_settings(
            tmp_path, max_concurrency=1, queue_size=4, request_timeout_s=0.2, inline_max_bytes=0
        )
    )
    scheduler: Scheduler = app.state.services.scheduler
    gate = threading.Event()

    async def scenario(ac: httpx.AsyncClient) -> tuple[httpx.Response, ...]:
        held = asyncio.ensure_future(scheduler.run("hold", gate.wait, timeout_s=math.inf))
        while scheduler.running == 0:
            await asyncio.sleep(0.005)
        v1 = await ac.post("/v1/attention", json=SMALL)
        v2 = await ac.post("/v2/models/attention/infer", content=orjson.dumps(SMALL_V2))
        assert scheduler.queued == 0  # both were taken off the queue when they timed out
        gate.set()
        await held
        after = await ac.post("/v1/attention", json=SMALL)
        return v1, v2, after

    v1, v2, after = asyncio.run(_asgi(app, scenario))
    problem = assert_problem(v1, 504)
    assert problem["type"].endswith(":timeout") and "ATTN_REQUEST_TIMEOUT_S" in problem["detail"]
    assert v2.status_code == 504 and v2.headers["content-type"] == "application/json"
    assert set(v2.json()) == {"error"} and "ATTN_REQUEST_TIMEOUT_S" in v2.json()["error"]
    assert after.status_code == 200
    assert _ran(app, "attention") == 1 and _ran(app, "v2-attention") == 0
    assert _abandoned(app, "attention", "timeout") == 1
    assert _abandoned(app, "v2-attention", "timeout") == 1


def test_a_running_request_past_the_timeout_is_504_and_stops_at_its_next_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = create_app(app_settings(tmp_path, max_concurrency=1, request_timeout_s=0.2))
    scheduler: Scheduler = app.state.services.scheduler
    gate = threading.Event()
    _hold(monkeypatch, attention_route, "attention", gate)

    async def scenario(ac: httpx.AsyncClient) -> tuple[httpx.Response, int]:
        r = await ac.post("/v1/attention", json=HEATMAP)
        running = scheduler.running  # answered while the thread is still busy
        gate.set()
        while scheduler.running:
            await asyncio.sleep(0.005)
        return r, running

    r, running = asyncio.run(_asgi(app, scenario))
    assert_problem(r, 504)
    assert running == 1
    assert _pngs(tmp_path / "heatmaps") == []


def test_no_timeout_when_the_setting_is_zero(tmp_path: Path) -> None:
    scheduler = Scheduler(max_concurrency=1, queue_size=1, timeout_s=0)

    def slow() -> str:
        time.sleep(0.3)
        return "done"

    async def scenario() -> str:
        return await scheduler.run("job", slow)

    assert asyncio.run(scenario()) == "done"
    scheduler.close()


# ---------------------------------------------------------------------------------------------
# The scheduler and its checkpoints, without HTTP


def test_checkpoint_outside_a_compute_job_does_nothing() -> None:
    checkpoint()  # the Python API used directly is never cancelled


def test_a_disconnect_cancels_the_running_job_at_its_checkpoints() -> None:
    scheduler = Scheduler(max_concurrency=1, queue_size=1)
    steps: list[int] = []
    outcome: list[BaseException] = []

    def job() -> None:
        try:
            for i in range(2000):  # a long job made of checkpointed steps
                checkpoint()
                steps.append(i)
                time.sleep(0.005)
        except Cancelled as exc:
            outcome.append(exc)
            raise

    async def scenario() -> None:
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        running = asyncio.ensure_future(scheduler.run("job", job, receive=receive))
        while len(steps) < 3:
            await asyncio.sleep(0.005)
        gone.set()
        with pytest.raises(ClientClosed):
            await running
        while scheduler.running:
            await asyncio.sleep(0.005)

    asyncio.run(scenario())
    scheduler.close()
    assert outcome and str(outcome[0]) == "disconnect"
    assert 3 <= len(steps) < 2000


def test_the_timeout_is_a_compute_timeout_naming_the_setting() -> None:
    scheduler = Scheduler(max_concurrency=1, queue_size=1, timeout_s=0.05)
    gate = threading.Event()

    async def scenario() -> None:
        with pytest.raises(ComputeTimeout, match="ATTN_REQUEST_TIMEOUT_S"):
            await scheduler.run("job", gate.wait)
        gate.set()
        # A per-call limit overrides the scheduler's.
        assert await scheduler.run("job", lambda: "ok", timeout_s=math.inf) == "ok"

    asyncio.run(scenario())
    scheduler.close()


def test_a_timeout_stops_a_running_native_call_early() -> None:
    """The kernel itself stops once the job is abandoned, not just at the next checkpoint."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((4, 8192, 64), dtype=np.float32) for _ in range(3))
    scheduler = Scheduler(max_concurrency=1, queue_size=1)
    outcome: list[BaseException] = []

    def job() -> float:
        start = time.perf_counter()
        try:
            service.attention(q, k, v)
        except Cancelled as exc:
            outcome.append(exc)
            raise
        return time.perf_counter() - start

    async def scenario() -> tuple[float, float]:
        uncancelled = await scheduler.run("job", job, timeout_s=math.inf)
        start = time.perf_counter()
        with pytest.raises(ComputeTimeout):
            await scheduler.run("job", job, timeout_s=0.05)
        while scheduler.running:  # the worker thread is free once the kernel has stopped
            await asyncio.sleep(0.002)
        return uncancelled, time.perf_counter() - start

    uncancelled, cancelled = asyncio.run(scenario())
    scheduler.close()
    assert outcome and isinstance(outcome[0], Cancelled) and str(outcome[0]) == "timeout"
    assert cancelled < uncancelled / 2, (cancelled, uncancelled)


def test_a_client_leaving_mid_body_is_no_server_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(app_settings(tmp_path))
    with LiveServer(app) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(
            b"POST /v1/attention HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"q": ['
        )

        def answered(status: str) -> float:
            return _sample(
                app,
                "attention_http_requests_total",
                method="POST",
                route="/v1/attention",
                status=status,
            )

        sock.close()
        _wait_until(lambda: answered("499") == 1, "the request is counted as closed by the client")
        assert answered("500") == 0
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
