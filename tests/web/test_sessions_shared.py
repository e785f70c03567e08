"""Memory sessions shared by real server processes on one store, the heatmap directory or a real
Redis (each test on both): a session opened on one server is continued on another, survives
every server's restart, and
concurrent appends through two servers never lose or reorder a segment: each is appended (200)
or refused (409) with nothing left behind, and the appended ones, replayed in the order of
their positions through service.MemorySession, give exactly the answers the servers gave."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson

import service
from tests.support.http import Server, decode, running_server
from tests.support.stores import StoreBackend

BOTH_STORES = True
SPEC = {"length": 64, "compressed": 4, "rate": 8}
ENV = {"ATTN_MAX_CONCURRENCY": "2", "ATTN_LOG_LEVEL": "warning"}


def qkv(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((4, n, 16)).astype(np.float32) for _ in range(3)]


def append(server: Server, sid: str, x: list[np.ndarray], p: int, n: int) -> httpx.Response:
    body = {name: np.ascontiguousarray(a[:, p : p + n]) for name, a in zip("qkv", x, strict=True)}
    return httpx.post(
        f"{server.url}/v1/sessions/{sid}/segments",
        content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        headers={"content-type": "application/json"},
        timeout=60,
    )


def open_session(server: Server) -> str:
    r = httpx.post(f"{server.url}/v1/sessions", json={"memory": SPEC, "causal": True})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def shared(tmp_path: Path, backend: StoreBackend) -> Callable[[str], dict[str, str]]:
    """name -> the environment of server `name` sharing one store with the others: one heatmap
    directory, or one Redis (and then a directory each: all they share goes through Redis)."""
    redis = backend.env()

    def env(name: str) -> dict[str, str]:
        directory = tmp_path / (f"own-{name}" if redis else "store")
        return {**ENV, **redis, "ATTN_HEATMAP_DIR": str(directory)}

    return env


def test_continued_by_another_server_and_after_a_restart(
    tmp_path: Path, store_backend: StoreBackend
) -> None:
    env = shared(tmp_path, store_backend)
    s, n = 32, 16 * 32
    x = qkv(1, n)
    whole = service.attention(*x, memory={**SPEC, "segment": s}, causal=True).output
    outs = []
    with (
        running_server(tmp_path / "a.log", env("a")) as a,
        running_server(tmp_path / "b.log", env("b")) as b,
    ):
        sid = open_session(a)
        for i, p in enumerate(range(0, n // 2, s)):  # alternating between the servers
            r = append(a if i % 2 == 0 else b, sid, x, p, s)
            assert r.status_code == 200, r.text
            outs.append(decode(r.json()["output"]))
    # Every server is stopped: no process holds anything of the session. A new one, started on
    # the same store, continues where they stopped.
    with running_server(tmp_path / "c.log", env("c")) as c:
        info = httpx.get(f"{c.url}/v1/sessions/{sid}").json()
        assert info["position"] == n // 2 and info["memory"] == {"raw": 64, "compressed": 4}
        for p in range(n // 2, n, s):
            r = append(c, sid, x, p, s)
            assert r.status_code == 200, r.text
            outs.append(decode(r.json()["output"]))
    assert len(outs) == 16
    np.testing.assert_allclose(np.concatenate(outs, axis=1), whole, atol=1e-5)


def test_concurrent_appends_never_lose_or_reorder_a_segment(
    tmp_path: Path, store_backend: StoreBackend
) -> None:
    env = shared(tmp_path, store_backend)
    s, count = 256, 12
    x = qkv(2, s * count)
    with (
        running_server(tmp_path / "a.log", env("a")) as a,
        running_server(tmp_path / "b.log", env("b")) as b,
    ):
        sid = open_session(a)
        # Segment i (its own data) is sent by one of several threads through either server.
        with ThreadPoolExecutor(6) as pool:
            answers = list(
                pool.map(lambda i: (i, append(a if i % 2 else b, sid, x, i * s, s)), range(count))
            )
        statuses = sorted(r.status_code for _, r in answers)
        assert set(statuses) <= {200, 409}, [r.text for _, r in answers]
        appended = sorted(
            ((r.json()["position"], i, decode(r.json()["output"])) for i, r in answers
             if r.status_code == 200),
            key=lambda t: t[0],
        )  # fmt: skip
        info = httpx.get(f"{a.url}/v1/sessions/{sid}").json()
    assert [p for p, _, _ in appended] == [s * (k + 1) for k in range(len(appended))]
    assert info["position"] == s * len(appended)
    for _, r in answers:
        if r.status_code == 409:
            assert "not appended" in r.json()["detail"]
    # Replayed in the order the store took them, the segments give the servers' answers.
    replay = service.MemorySession(SPEC, causal=True)
    for _, i, out in appended:
        seg = [a[:, i * s : (i + 1) * s] for a in x]
        np.testing.assert_allclose(replay.append(*seg).output, out, atol=1e-5)
    print(f"{len(appended)} appended, {count - len(appended)} refused with 409")
