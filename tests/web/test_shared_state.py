"""Two service processes on one real Redis (ATTN_REDIS_URL), as replicas behind a load balancer
would run: a heatmap made by one is served by the other, one rate budget per API key spans both
(whatever the order of their ATTN_API_KEYS), and Redis stopped and started again mid-run gives
the documented behaviour: not ready within 5 s, stateless compute still answered, stateful
requests 503 with Retry-After (never 404), the rate limit failing open (counted), and everything
back within 10 s of Redis's return with what Redis held intact."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.support.http import PROBLEM, Server, running_server
from tests.support.redis_server import RedisServer

ALPHA, BETA, GAMMA, DELTA, EPSILON, ZETA = (
    "alpha-key-000000",
    "beta-key-111111",
    "gamma-key-22222",
    "delta-key-3333",
    "epsilon-key-444",  # a session's
    "zeta-key-555555",  # a /v2 sequence's
)
RATE = 4  # per minute, 4 at once: one token every 15 s, so none comes back during the module
QKV = {"q": np.eye(3).tolist(), "k": np.eye(3).tolist(), "v": [[1, 2], [3, 4], [5, 6]]}
V2_INFER = {
    "inputs": [
        {"name": n, "shape": [2, 2], "datatype": "FP32", "data": [1, 0, 0, 1]}
        for n in ("q", "k", "v")
    ],
    "parameters": {"heatmap": True},
}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def replicas(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    tmp = tmp_path_factory.mktemp("replicas")
    common = {
        "ATTN_REDIS_URL": redis.url,
        "ATTN_RATE_LIMIT": str(RATE),
        # Each has its own (empty) heatmap directory: whatever they share goes through Redis.
        "ATTN_HEATMAP_DIR": str(tmp / "unused"),
    }
    env_a = {**common, "ATTN_API_KEYS": f"{ALPHA},{BETA},{GAMMA},{DELTA},{EPSILON},{ZETA}"}
    env_b = {
        **common,
        "ATTN_API_KEYS": f"{ZETA},{EPSILON},{DELTA},{GAMMA},{BETA},{ALPHA}",
    }  # reordered
    args = ("--log-level", "warning")
    with (
        running_server(tmp / "a.log", env_a, *args) as a,
        running_server(tmp / "b.log", env_b, *args) as b,
    ):
        yield a, b


def test_both_are_ready_on_redis_and_tell_which_replica_answered(
    replicas: tuple[Server, Server],
) -> None:
    a, b = replicas
    ready = [httpx.get(f"{s.url}/readyz").json() for s in (a, b)]
    for r, s in zip(ready, (a, b), strict=True):
        assert r["store"]["backend"] == "redis" and r["store"]["connected"] is True
        assert r["replica"]["pid"] == s.proc.pid and r["replica"]["server"] == "uvicorn"
    assert ready[0]["replica"]["id"] != ready[1]["replica"]["id"]


def test_a_heatmap_made_on_one_is_served_by_the_other(replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    r = httpx.post(f"{a.url}/v1/attention", json={**QKV, "heatmap": True}, headers=auth(GAMMA))
    assert r.status_code == 200, r.text
    url = r.json()["heatmaps"][0]["url"]
    from_a = httpx.get(a.url + url, headers=auth(GAMMA))
    from_b = httpx.get(b.url + url, headers=auth(GAMMA))
    assert from_a.status_code == from_b.status_code == 200
    assert from_b.content == from_a.content and from_b.content.startswith(b"\x89PNG")
    assert from_b.headers["etag"] == from_a.headers["etag"]
    # The other way round, through the Open Inference Protocol front.
    v2 = httpx.post(f"{b.url}/v2/models/attention/infer", json=V2_INFER, headers=auth(GAMMA))
    assert v2.status_code == 200, v2.text
    urls = [v for k, v in v2.json()["parameters"].items() if k.startswith("heatmap")]
    assert urls and httpx.get(a.url + urls[0], headers=auth(GAMMA)).status_code == 200


def test_one_rate_budget_per_key_across_both(replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    codes = [
        httpx.post(f"{s.url}/v1/attention", json=QKV, headers=auth(ALPHA)).status_code
        for s in (a, b, a, b, a, b)
    ]
    assert codes == [200] * RATE + [429, 429]  # 4 in all, not 4 each
    refused = httpx.post(f"{b.url}/v1/attention", json=QKV, headers=auth(ALPHA))
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 15
    # Another key has a budget of its own.
    assert httpx.post(f"{b.url}/v1/attention", json=QKV, headers=auth(BETA)).status_code == 200


SESSION = {"memory": {"length": 4}, "causal": True}
SEGMENT = {
    "q": [[1.0, 0.0], [0.0, 1.0]],
    "k": [[1.0, 0.0], [0.0, 1.0]],
    "v": [[1.0, 2.0], [3.0, 4.0]],
}


def _append(server: Server, sid: str) -> httpx.Response:
    url = f"{server.url}/v1/sessions/{sid}/segments"
    return httpx.post(url, json=SEGMENT, headers=auth(EPSILON), timeout=10)


def _sequence(server: Server, **params: object) -> httpx.Response:
    """A /v2 request of sequence 7: two positions, with the memory parameters when it starts."""
    memory = {"memory_length": 4} if params.get("sequence_start") else {}
    body = {**V2_INFER, "parameters": {"sequence_id": 7, **memory, **params}}
    url = f"{server.url}/v2/models/attention/infer"
    return httpx.post(url, json=body, headers=auth(ZETA), timeout=10)


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_redis_stopped_and_started_again_mid_run(
    redis: RedisServer, replicas: tuple[Server, Server]
) -> None:
    a, b = replicas
    made = httpx.post(f"{a.url}/v1/attention", json={**QKV, "heatmap": True}, headers=auth(DELTA))
    url = made.json()["heatmaps"][0]["url"]
    png = httpx.get(b.url + url, headers=auth(DELTA)).content
    # A memory session, one segment in, and a /v2 sequence opened (keys with budgets of their
    # own: rate limits are not what this test is about).
    opened = httpx.post(f"{a.url}/v1/sessions", json=SESSION, headers=auth(EPSILON))
    assert opened.status_code == 201, opened.text
    sid = opened.json()["id"]
    assert _append(b, sid).status_code == 200
    assert _sequence(a, sequence_start=True).status_code == 200

    redis.stop()
    for s in (a, b):
        t0 = time.monotonic()
        ready = httpx.get(f"{s.url}/readyz", timeout=10)
        assert time.monotonic() - t0 < 5
        assert ready.status_code == 503 and ready.headers["content-type"] == PROBLEM
        assert "Redis" in ready.json()["detail"]
        assert httpx.get(f"{s.url}/v2/health/ready", timeout=10).status_code != 200
        assert httpx.get(f"{s.url}/healthz").status_code == 200  # alive all the same

    # Stateless compute is answered, over the exhausted budget too: the limiter fails open.
    for s in (a, b):
        before = _metric(s, "attention_rate_limit_fail_open_total")
        r = httpx.post(f"{s.url}/v1/attention", json=QKV, headers=auth(ALPHA))
        assert r.status_code == 200, r.text
        inline = {**QKV, "heatmap": {"inline": True}}
        r = httpx.post(f"{s.url}/v1/attention", json=inline, headers=auth(ALPHA))
        assert r.status_code == 200 and r.json()["heatmaps"][0]["png"]
        assert _metric(s, "attention_rate_limit_fail_open_total") >= before + 2
    assert "failing open" in a.log.read_text() and "failing open" in b.log.read_text()

    # What needs state is 503 with Retry-After: a stored heatmap made or fetched, never a 404.
    for s in (a, b):
        made = httpx.post(
            f"{s.url}/v1/attention", json={**QKV, "heatmap": True}, headers=auth(DELTA)
        )
        assert made.status_code == 503 and made.headers["retry-after"] == "1"
        assert made.json()["type"].endswith("store-unavailable")
        fetched = httpx.get(s.url + url, headers=auth(DELTA))
        assert fetched.status_code == 503 and fetched.headers["retry-after"] == "1"
        v2 = httpx.post(f"{s.url}/v2/models/attention/infer", json=V2_INFER, headers=auth(DELTA))
        assert v2.status_code == 503 and set(v2.json()) == {"error"}
        # A session read or continued: 503 with Retry-After, never 404 (it may well exist).
        for r in (httpx.get(f"{s.url}/v1/sessions/{sid}", headers=auth(EPSILON)), _append(s, sid)):
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
            assert r.json()["type"].endswith("store-unavailable")
        seq = _sequence(s)
        assert seq.status_code == 503 and set(seq.json()) == {"error"}, seq.text
        assert seq.headers["retry-after"] == "1"

    redis.start()  # same port, same data directory: Redis reloads what it saved
    back = time.monotonic()
    for s in (a, b):
        while httpx.get(f"{s.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() - back < 10, "not ready again within 10 s"
            time.sleep(0.2)
    # Nothing was flushed or rebuilt: the heatmap made before the outage is served again.
    for s in (a, b):
        again = httpx.get(s.url + url, headers=auth(DELTA))
        assert again.status_code == 200 and again.content == png
        r = httpx.post(f"{s.url}/v1/attention", json={**QKV, "heatmap": True}, headers=auth(DELTA))
        assert r.status_code == 200, r.text
    # The session and the sequence are where they were, and go on, on either replica.
    got = httpx.get(f"{b.url}/v1/sessions/{sid}", headers=auth(EPSILON))
    assert got.status_code == 200 and got.json()["position"] == 2
    assert _append(a, sid).json()["position"] == 4
    seq = _sequence(b, sequence_end=True)
    assert seq.status_code == 200 and seq.json()["parameters"]["sequence_position"] == 4


def test_logs_never_show_a_key_or_a_redis_password(replicas: tuple[Server, Server]) -> None:
    logs = "".join(Path(s.log).read_text() for s in replicas)
    assert not any(key in logs for key in (ALPHA, BETA, GAMMA, DELTA))
