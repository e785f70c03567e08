"""The app around the endpoints: body limits, problem documents, overload, health, metrics, docs."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.core.options import AttentionOptions
from service.core.tensor_codec import decode_tensor
from service.web.app import create_app
from service.web.problems import Overloaded
from service.web.scheduler import Scheduler
from tests.support.http import PROBLEM, app_client, app_settings, assert_problem, b64, post
from tests.support.reference import reference_attention

QKV = {"q": [[1.0, 0.0]], "k": [[1.0, 0.0]], "v": [[0.5, 0.5]]}


# Settings of this module's `client` fixture (tests/conftest.py).
APP_SETTINGS = {"max_body_bytes": 100_000}


# ---------------------------------------------------------------------------------------------
# Body size: 413 before the body is read whole


class CountingBody:
    """A request body streamed in chunks, counting how many the server pulled."""

    def __init__(self, chunks: int, size: int = 10_000) -> None:
        self.chunks, self.size, self.pulled = chunks, size, 0

    def __iter__(self) -> Iterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b" " * self.size

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self:
            yield chunk


JSON = {"content-type": "application/json"}


def _asgi(tmp_path: Path, **overrides: Any) -> httpx.AsyncClient:
    app = create_app(app_settings(tmp_path, **overrides))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def test_declared_content_length_over_the_limit_is_refused_unread(tmp_path: Path) -> None:
    body = CountingBody(chunks=100)  # 1 MB declared and streamed

    async def scenario() -> httpx.Response:
        async with _asgi(tmp_path, max_body_bytes=100_000) as ac:
            return await ac.post(
                "/v1/attention",
                content=body.stream(),
                headers={"content-length": str(1_000_000), "content-type": "application/json"},
            )

    r = asyncio.run(scenario())
    problem = assert_problem(r, 413)
    assert "100000" in problem["detail"] and "ATTN_MAX_BODY_BYTES" in problem["detail"]
    assert body.pulled <= 1  # the server never asked for the body


def test_chunked_body_over_the_limit_is_cut_off_early(tmp_path: Path) -> None:
    body = CountingBody(chunks=1000)  # 10 MB, no Content-Length

    async def scenario() -> httpx.Response:
        async with _asgi(tmp_path, max_body_bytes=100_000) as ac:
            return await ac.post("/v1/attention", content=body.stream(), headers=JSON)

    r = asyncio.run(scenario())
    assert_problem(r, 413)
    assert body.pulled < 20  # refused as soon as the limit passed, not after 10 MB


def test_body_limit_in_the_test_client(client) -> None:
    big = np.zeros((200, 100), np.float32)
    assert_problem(post(client, "/v1/attention", {**QKV, "q": b64(big)}), 413)
    # chunked through the TestClient
    r = client.post("/v1/attention", content=CountingBody(50), headers=JSON)
    assert_problem(r, 413)
    assert post(client, "/v1/attention", QKV).status_code == 200  # the app still serves


def test_invalid_content_length_is_400(tmp_path: Path) -> None:
    async def scenario() -> httpx.Response:
        async with _asgi(tmp_path) as ac:
            return await ac.post("/v1/attention", content=b"{}", headers={"content-length": "-5"})

    assert_problem(asyncio.run(scenario()), 400)


# ---------------------------------------------------------------------------------------------
# Problem documents for routing errors


def test_404_and_405_are_problem_json(client) -> None:
    r = client.get("/v1/nothing")
    assert_problem(r, 404)
    assert r.json()["type"] == "about:blank" and r.json()["instance"] == "/v1/nothing"
    r = client.get("/v1/attention")
    assert_problem(r, 405)
    assert r.headers["allow"] == "POST"
    assert_problem(client.delete("/healthz"), 405)
    assert_problem(client.put("/v1/tokens", json={}), 405)


def test_validation_problem_lists_every_error(client) -> None:
    r = post(client, "/v1/attention", {"q": "x", "k": [[1.0]], "causal": 3, "window": {"left": -2}})
    body = assert_problem(r, 422)
    locs = [e["loc"] for e in body["errors"]]
    assert ["q"] in locs and ["v"] in locs and ["window", "left"] in locs
    assert all(isinstance(e["msg"], str) and e["msg"] for e in body["errors"])
    assert body["type"].endswith("invalid-input") and body["title"] == "Invalid input"


# ---------------------------------------------------------------------------------------------
# Overload: at most max_concurrency at once, a bounded queue, then 503 at once


def test_full_queue_answers_503_with_retry_after_at_once(tmp_path: Path) -> None:
    # inline_max_bytes=0: small /v1 requests queue instead of being answered on the event loop.
    app = create_app(
        app_settings(tmp_path, max_concurrency=1, queue_size=1, retry_after_s=3, inline_max_bytes=0)
    )
    scheduler: Scheduler = app.state.services.scheduler
    gate = threading.Event()

    async def scenario() -> tuple[httpx.Response, float, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            blocker = asyncio.ensure_future(scheduler.run("block", gate.wait))
            while scheduler.running == 0:
                await asyncio.sleep(0.005)
            queued = asyncio.ensure_future(ac.post("/v1/attention", json=QKV))
            while scheduler.queued == 0:
                await asyncio.sleep(0.005)
            start = time.perf_counter()
            rejected = await ac.post("/v1/attention", json=QKV)
            waited = time.perf_counter() - start
            gate.set()
            await blocker
            after = await ac.post("/v1/attention", json=QKV)
            return rejected, waited, await queued, after

    rejected, waited, queued, after = asyncio.run(scenario())
    problem = assert_problem(rejected, 503)
    assert rejected.headers["retry-after"] == "3"
    assert "ATTN_MAX_CONCURRENCY=1" in problem["detail"]
    assert waited < 5  # not queued behind the blocked job (which never ends by itself)
    assert queued.status_code == 200 and after.status_code == 200


def test_small_requests_are_answered_on_the_event_loop_while_the_workers_are_busy(
    tmp_path: Path,
) -> None:
    """With the defaults a small computation (a b64 128 x 64 attention) never waits for a worker:
    answered on the event loop while the only worker is held; a request with heatmaps (or too
    large) still queues for it."""
    app = create_app(app_settings(tmp_path, max_concurrency=1, queue_size=4))
    scheduler: Scheduler = app.state.services.scheduler
    gate = threading.Event()
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((128, 64)).astype(np.float32) for _ in range(3))
    body = {n: b64(a) for n, a in zip("qkv", (q, k, v), strict=True)}

    async def scenario() -> tuple[httpx.Response, int, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            blocker = asyncio.ensure_future(scheduler.run("block", gate.wait))
            while scheduler.running == 0:
                await asyncio.sleep(0.005)
            # Queued, it would wait for the held worker: bounded so that the test fails instead.
            small = await asyncio.wait_for(ac.post("/v1/attention", json=body), 30)
            drawn = asyncio.ensure_future(ac.post("/v1/attention", json={**QKV, "heatmap": True}))
            while scheduler.queued == 0:
                await asyncio.sleep(0.005)
            queued = scheduler.queued
            gate.set()
            await blocker
            return small, queued, await drawn

    small, queued, drawn = asyncio.run(scenario())
    assert small.status_code == 200, small.text
    expected = reference_attention(q[None, None], k[None, None], v[None, None]).output[0, 0]
    np.testing.assert_allclose(decode_tensor(small.json()["output"]), expected, atol=1e-4)
    assert queued == 1 and drawn.status_code == 200 and drawn.json()["heatmaps"]


def test_scheduler_never_runs_more_than_max_concurrency() -> None:
    scheduler = Scheduler(max_concurrency=2, queue_size=10)
    lock = threading.Lock()
    active = peak = 0

    def job() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.02)
        with lock:
            active -= 1

    async def scenario() -> None:
        await asyncio.gather(*(scheduler.run("job", job) for _ in range(8)))

    asyncio.run(scenario())
    scheduler.close()
    assert peak == 2


def test_scheduler_rejects_beyond_the_queue_and_recovers() -> None:
    scheduler = Scheduler(max_concurrency=1, queue_size=2)
    gate = threading.Event()

    async def scenario() -> list[Any]:
        tasks = [asyncio.ensure_future(scheduler.run("job", gate.wait)) for _ in range(3)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):
            await scheduler.run("job", gate.wait)
        gate.set()
        results = await asyncio.gather(*tasks)
        results.append(await scheduler.run("job", lambda: "again"))
        return results

    assert asyncio.run(scenario())[-1] == "again"
    assert scheduler.running == 0 and scheduler.queued == 0
    scheduler.close()


def test_a_cancelled_waiter_frees_its_queue_slot() -> None:
    scheduler = Scheduler(max_concurrency=1, queue_size=1)
    gate = threading.Event()

    async def scenario() -> str:
        running = asyncio.ensure_future(scheduler.run("job", gate.wait))
        await asyncio.sleep(0.02)
        waiting = asyncio.ensure_future(scheduler.run("job", lambda: "never"))
        await asyncio.sleep(0.02)
        waiting.cancel()  # the client went away while queued
        await asyncio.sleep(0.02)
        gate.set()
        await running
        return await scheduler.run("job", lambda: "free")

    assert asyncio.run(scenario()) == "free"
    scheduler.close()


# ---------------------------------------------------------------------------------------------
# Health, readiness, metrics, docs


def test_health_and_readiness(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["status"] == "ready" and body["store"]["writable"] is True
    assert body["native"]["isa"] and body["native"]["version"]


def test_not_ready_when_the_store_is_not_writable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the store directory should be")
    with app_client(tmp_path, heatmap_dir=blocker / "heatmaps") as broken:
        body = assert_problem(broken.get("/readyz"), 503)
        assert "not writable" in body["detail"]
        assert broken.get("/healthz").status_code == 200
        # Computing still works; only images cannot be stored.
        assert post(broken, "/v1/attention", QKV).status_code == 200


def test_metrics_count_requests_latency_and_compute(client) -> None:
    post(client, "/v1/attention", QKV)
    client.get("/v1/heatmaps/AAAAAAAAAAAAAAAAAAAAAA.png")
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")
    assert 'attention_http_requests_total{method="POST",route="/v1/attention",status="200"}' in text
    # Route templates, never raw ids, label the requests.
    assert 'route="/v1/heatmaps/{heatmap_id}.png",status="404"' in text
    assert "AAAAAAAAAAAAAAAAAAAAAA" not in text
    assert (
        'attention_http_request_duration_seconds_count{method="POST",route="/v1/attention"}' in text
    )
    assert 'attention_compute_seconds_count{job="attention"}' in text
    assert "attention_compute_running" in text and "attention_compute_queued" in text


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    with app_client(tmp_path / "a") as a, app_client(tmp_path / "b") as b:
        post(a, "/v1/attention", QKV)
        assert 'route="/v1/attention"' in a.get("/metrics").text
        assert 'route="/v1/attention"' not in b.get("/metrics").text


def test_openapi_documents_every_model_with_examples(client) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for name in (
        "AttentionRequest",
        "MultiheadRequest",
        "TokensRequest",
        "AttentionResponse",
        "MultiheadResponse",
        "TokensResponse",
        "ModelTokensRequest",
        "HeatmapSpec",
        "HeatmapRef",
        "Problem",
    ):
        assert name in schemas, name
        assert schemas[name].get("examples"), name
    for path in ("/v1/attention", "/v1/multihead", "/v1/tokens"):
        op = spec["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        # /v1/tokens: the random-embedding pipeline or a real model ("model").
        for ref in [body["$ref"]] if "$ref" in body else [r["$ref"] for r in body["oneOf"]]:
            assert ref.split("/")[-1] in schemas
        assert {"200", "413", "422", "503"} <= set(op["responses"])
        assert PROBLEM in op["responses"]["422"]["content"]
    # The request schemas carry every option of the shared options model.
    props = schemas["AttentionRequest"]["properties"]
    assert {*AttentionOptions.model_fields, "q", "k", "v", "heatmap", "encoding"} <= set(props)
    assert {"/v1/heatmaps/{heatmap_id}.png", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.web.settings import Settings

    defaults = Settings()
    assert defaults.max_body_bytes == 64 << 20 and defaults.heatmap_max_side == 1024
    assert defaults.max_concurrency == len(os.sched_getaffinity(0))
    monkeypatch.setenv("ATTN_WORKERS", "2")
    monkeypatch.setenv("ATTN_QUEUE_SIZE", "5")
    monkeypatch.setenv("ATTN_HEATMAP_TTL_S", "9")
    s = Settings()
    assert (s.workers, s.queue_size, s.heatmap_ttl_s) == (2, 5, 9)
    # Cores are shared out among worker processes, and among computations within one.
    assert s.max_concurrency == max(1, len(os.sched_getaffinity(0)) // 2)
    assert s.max_concurrency * s.workers * s.native_threads <= max(2, os.cpu_count() or 1)


def test_overload_is_answered_before_the_body_is_read(tmp_path: Path) -> None:
    app = create_app(app_settings(tmp_path, max_concurrency=1, queue_size=0))
    scheduler: Scheduler = app.state.services.scheduler
    gate = threading.Event()
    body = CountingBody(chunks=100)

    async def scenario() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as ac:
            blocker = asyncio.ensure_future(scheduler.run("block", gate.wait))
            while scheduler.running == 0:
                await asyncio.sleep(0.005)
            r = await ac.post("/v1/tokens", content=body.stream(), headers=JSON)
            gate.set()
            await blocker
            return r

    assert_problem(asyncio.run(scenario()), 503)
    assert body.pulled <= 1
