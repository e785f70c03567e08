"""`attention-service ray`: the app as two Ray Serve replicas on a local 2-CPU Ray cluster that
the command starts (and stops). The same requests get the same answers as from uvicorn, route
by route (results, errors, limits, authentication, both protocol fronts), and requests spread
over both replicas, which /readyz names."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.http import Server, running_server

pytest.importorskip("ray.serve", reason="the `ray` extra is not installed")
pytestmark = pytest.mark.ray

KEY = "ray-test-key-0123"
ENV = {
    "ATTN_API_KEYS": KEY,
    "ATTN_MAX_BODY_BYTES": "200000",
    "ATTN_LOG_LEVEL": "warning",
    "RAY_USAGE_STATS_ENABLED": "0",
}
HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """(uvicorn, Ray Serve) on their own heatmap directories, same settings."""
    tmp = tmp_path_factory.mktemp("ray-serve")
    env_u = {**ENV, "ATTN_HEATMAP_DIR": str(tmp / "uvicorn")}
    env_r = {**ENV, "ATTN_HEATMAP_DIR": str(tmp / "ray")}
    ray_args = ("--replicas", "2", "--num-cpus", "2")
    with (
        running_server(tmp / "uvicorn.log", env_u, "--log-level", "warning") as uvicorn,
        running_server(
            tmp / "ray.log", env_r, *ray_args, command=("ray",), ready_timeout_s=300
        ) as ray_server,
    ):
        yield uvicorn, ray_server


def _same(a: Any, b: Any, path: str = "") -> None:
    """Equal JSON, timings and ids apart."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, a, b)
        for k in a:
            if k in ("elapsed_ms", "id", "url", "kernel_ms") or k.startswith("heatmap_"):
                continue
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-7), (path, a, b)
    else:
        assert a == b, (path, a, b)


rng = np.random.default_rng(3)
QKV = {name: rng.standard_normal((2, 6, 8)).round(4).tolist() for name in ("q", "k", "v")}
V2 = {
    "inputs": [
        {"name": n, "shape": [1, 4, 2], "datatype": "FP32", "data": list(range(8))}
        for n in ("q", "k", "v")
    ],
    "parameters": {"causal": True},
}
REQUESTS: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
    ("POST", "/v1/attention", {**QKV, "causal": True, "return_weights": True}, HEADERS),
    ("POST", "/v1/attention", {**QKV, "window": {"left": 1, "right": 0}}, HEADERS),
    (
        "POST",
        "/v1/attention",
        {**QKV, "causal": True, "memory": {"segment": 2, "length": 2}},
        HEADERS,
    ),  # fmt: skip
    ("POST", "/v1/sessions", {"memory": {"length": 0, "compressed": 1}}, HEADERS),  # 422
    ("GET", "/v1/sessions/unknown-session", None, HEADERS),  # 404
    ("POST", "/v1/multihead", {"query": QKV["q"], "num_heads": 2, "seed": 1}, HEADERS),
    ("POST", "/v1/tokens", {"text": "the cat sat", "d_model": 8, "num_heads": 2}, HEADERS),
    ("POST", "/v1/attention", {"q": [[1, 0]], "k": [[1, 0, 0]], "v": [[1, 2]]}, HEADERS),
    ("POST", "/v1/attention", QKV, {}),  # no key: 401
    ("POST", "/v1/attention", {"q": [[0.5] * 8] * 6000, "k": [], "v": []}, HEADERS),  # 413
    ("GET", "/v1/nowhere", None, HEADERS),
    ("POST", "/v2/models/attention/infer", V2, HEADERS),
    ("GET", "/v2/models/attention", None, HEADERS),
    ("GET", "/v2/models/unknown", None, HEADERS),
    ("GET", "/v1/models", None, HEADERS),
    ("GET", "/healthz", None, {}),
    ("GET", "/openapi.json", None, {}),
]


@pytest.mark.parametrize(("method", "path", "body", "headers"), REQUESTS)
def test_every_route_answers_as_under_uvicorn(
    servers: tuple[Server, Server],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    headers: dict[str, str],
) -> None:
    answers = [
        httpx.request(method, s.url + path, json=body, headers=headers, timeout=60) for s in servers
    ]
    (u, r) = answers
    assert r.status_code == u.status_code, (r.text, u.text)
    assert r.headers["content-type"] == u.headers["content-type"]
    for name in ("www-authenticate", "retry-after"):
        assert r.headers.get(name) == u.headers.get(name)
    _same(u.json(), r.json())


def test_heatmaps_are_made_and_served(servers: tuple[Server, Server]) -> None:
    _, ray_server = servers
    body = {**QKV, "heatmap": {"heads": [0]}}
    made = httpx.post(f"{ray_server.url}/v1/attention", json=body, headers=HEADERS, timeout=60)
    assert made.status_code == 200, made.text
    # Both replicas run on this node and share its heatmap directory, so any of them serves it.
    for _ in range(4):
        png = httpx.get(ray_server.url + made.json()["heatmaps"][0]["url"], headers=HEADERS)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_a_session_streams_through_the_replicas(servers: tuple[Server, Server]) -> None:
    """Segments of one session, whichever replica takes each (both on this node's store), give
    the memory option's answer for the whole sequence, computed by uvicorn."""
    uvicorn, ray_server = servers
    memory = {"length": 2, "compressed": 1, "rate": 2}
    whole = httpx.post(
        f"{uvicorn.url}/v1/attention",
        json={**QKV, "causal": True, "memory": {**memory, "segment": 2}},
        headers=HEADERS,
    ).json()["output"]
    opened = httpx.post(
        f"{ray_server.url}/v1/sessions", json={"memory": memory, "causal": True}, headers=HEADERS
    )
    assert opened.status_code == 201, opened.text
    url = f"{ray_server.url}/v1/sessions/{opened.json()['id']}/segments"
    outs = []
    for p in range(0, 6, 2):
        part = {name: np.array(a)[:, p : p + 2].tolist() for name, a in QKV.items()}
        r = httpx.post(url, json=part, headers=HEADERS, timeout=60)
        assert r.status_code == 200 and r.json()["position"] == p + 2, r.text
        outs.append(np.array(r.json()["output"]))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), np.array(whole), atol=1e-5)


def test_two_replicas_answer_and_requests_spread(servers: tuple[Server, Server]) -> None:
    _, ray_server = servers
    seen: Counter[tuple[str, int]] = Counter()
    for _ in range(40):
        replica = httpx.get(f"{ray_server.url}/readyz", timeout=30).json()["replica"]
        assert replica["server"] == "ray"
        seen[(replica["id"], replica["pid"])] += 1
    assert len(seen) == 2, seen
    assert len({pid for _, pid in seen}) == 2 and os.getpid() not in {p for _, p in seen}
    assert min(seen.values()) >= 5, seen  # both take a real share, not a stray request


def test_chunks_split_the_keys_on_ray_and_are_refused_on_uvicorn(
    servers: tuple[Server, Server],
) -> None:
    uvicorn, ray_server = servers
    body = {**QKV, "causal": True, "return_weights": True, "window": {"left": 2, "right": 0}}
    memory = {**QKV, "return_weights": True, "memory": {"segment": 2, "length": 2,
              "compressed": 1, "rate": 2}}  # fmt: skip
    for request, counts in ((body, (1, 3, 6)), (memory, (4,))):
        whole = httpx.post(f"{uvicorn.url}/v1/attention", json=request, headers=HEADERS)
        for chunks in counts:
            split = httpx.post(
                f"{ray_server.url}/v1/attention", json={**request, "chunks": chunks},
                headers=HEADERS, timeout=120,
            )  # fmt: skip
            assert split.status_code == 200, split.text
            for name in ("output", "weights", "slot_weights")[: 3 if request is memory else 2]:
                got, want = np.array(split.json()[name]), np.array(whole.json()[name])
                assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    v2 = {**V2, "parameters": {"causal": True, "chunks": 2}}
    got = httpx.post(f"{ray_server.url}/v2/models/attention/infer", json=v2, headers=HEADERS)
    want = httpx.post(f"{uvicorn.url}/v2/models/attention/infer", json=V2, headers=HEADERS)
    assert got.status_code == 200, got.text
    np.testing.assert_allclose(
        got.json()["outputs"][0]["data"], want.json()["outputs"][0]["data"], rtol=1e-5
    )
    # Refused, naming chunks: on uvicorn, and with what runs in one process.
    refused = [
        httpx.post(f"{uvicorn.url}/v1/attention", json={**body, "chunks": 2}, headers=HEADERS),
        httpx.post(
            f"{ray_server.url}/v1/attention",
            json={**body, "chunks": 2, "stats": True},
            headers=HEADERS,
        ),  # fmt: skip
        httpx.post(f"{ray_server.url}/v1/attention", json={**QKV, "chunks": 7}, headers=HEADERS),
    ]
    for r in refused:
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["chunks"], r.text
    assert "uvicorn" in refused[0].json()["detail"]
    v2_refused = httpx.post(f"{uvicorn.url}/v2/models/attention/infer", json=v2, headers=HEADERS)
    assert v2_refused.status_code == 400 and "chunks" in v2_refused.json()["error"]
