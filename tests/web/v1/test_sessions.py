"""/v1/sessions in process: a stream of segments answers what /v1/attention's memory option
answers for the whole sequence (itself checked against the float64 reference in
tests/core/test_memory.py), the session's life (201, GET, DELETE 204, 404 once gone or expired),
heatmaps of [compressed | memory | segment], bad input refused with the session unchanged,
ATTN_SESSION_MAX, API keys, and a segment computed on a state that moved on answered 409.
Sessions shared by several server processes: tests/web/test_sessions_shared.py."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

import service
from service.web import sessions
from tests.support.http import app_client, assert_problem, b64, decode, post
from tests.support.stores import StoreBackend

APP_SETTINGS = {"max_elements": 200_000}
BOTH_STORES = True  # every test on the file store and on a real Redis
SPEC = {"length": 32, "compressed": 4, "rate": 8, "pool": "mean"}


def qkv(seed: int, n: int, shape: tuple[int, ...] = (2,), d: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((*shape, n, d)).astype(np.float32) for _ in range(3)]


def segment(x: list[np.ndarray], p: int, n: int, **extra: Any) -> dict[str, Any]:
    return {
        name: np.ascontiguousarray(a[..., p : p + n, :]) for name, a in zip("qkv", x, strict=True)
    } | extra


def open_session(c, **body: Any) -> dict[str, Any]:
    r = post(c, "/v1/sessions", {"memory": SPEC, **body})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.mark.parametrize("causal", [True, False])
def test_sixteen_segments_equal_the_memory_option(client, causal: bool) -> None:
    s, n = 16, 16 * 16 - 8  # the last segment shorter (a multiple of the rate)
    x = qkv(1, n)
    info = open_session(client, causal=causal, scale=0.3)
    outs = []
    for p in range(0, n, s):
        r = post(client, f"/v1/sessions/{info['id']}/segments", segment(x, p, s))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["position"] == min(n, p + s)
        held = {"raw": min(p, 32), "compressed": min(max(0, (p - 32) // 8), 4)}
        assert body["memory"] == held
        outs.append(decode(body["output"]))
    whole = post(client, "/v1/attention", {"q": x[0], "k": x[1], "v": x[2], "causal": causal,
                 "scale": 0.3, "memory": {**SPEC, "segment": s}})  # fmt: skip
    assert whole.status_code == 200, whole.text
    np.testing.assert_allclose(np.concatenate(outs, axis=1), decode(whole.json()["output"]),
                               atol=1e-5)  # fmt: skip


def _redis_ttl_s(client, store_backend: StoreBackend, sid: str) -> float | None:
    """On Redis, the expiry Redis itself holds for the session's record (seconds)."""
    if not store_backend.redis_url:
        return None
    prefix = client.app.state.services.settings.redis_prefix
    pttl = redis.Redis.from_url(store_backend.redis_url).pttl(f"{prefix}record:sessions:{sid}")
    return pttl / 1000


def test_life_of_a_session(client, store_backend: StoreBackend) -> None:
    r = post(client, "/v1/sessions", {"memory": SPEC, "causal": True, "ttl_s": 600})
    assert r.status_code == 201
    info = r.json()
    assert r.headers["location"] == f"/v1/sessions/{info['id']}"
    assert info["position"] == 0 and info["ttl_s"] == 600 and info["shape"] is None
    assert info["memory"] == {"raw": 0, "compressed": 0}
    assert info["options"] == {"memory": SPEC, "causal": True, "scale": None}
    assert info["expires_at"].endswith("Z")
    if (expiry := _redis_ttl_s(client, store_backend, info["id"])) is not None:
        assert 590 < expiry <= 600  # Redis expires it: the session's TTL, not the heatmaps'
    x = qkv(2, 16, (1, 2), d=4)
    r = post(client, f"/v1/sessions/{info['id']}/segments", segment(x, 0, 16, encoding="b64"))
    assert r.status_code == 200 and r.json()["output"]["shape"] == [1, 2, 16, 4]
    got = client.get(f"/v1/sessions/{info['id']}").json()
    assert got["position"] == 16 and got["memory"] == {"raw": 16, "compressed": 0}
    assert got["shape"] == {"rank": 4, "batch": 1, "heads": 2, "kv_heads": 2, "head_dim": 4,
                            "value_dim": 4}  # fmt: skip
    assert client.delete(f"/v1/sessions/{info['id']}").status_code == 204
    for r in (
        client.get(f"/v1/sessions/{info['id']}"),
        client.delete(f"/v1/sessions/{info['id']}"),
        post(client, f"/v1/sessions/{info['id']}/segments", segment(x, 0, 16)),
        client.get("/v1/sessions/not-a-session"),
        client.get("/v1/sessions/..%2F..%2Fetc"),
    ):
        assert_problem(r, 404)


def test_weights_and_heatmap_of_a_segment(client) -> None:
    x = qkv(3, 64, (2,))
    info = open_session(client, causal=True)
    url = f"/v1/sessions/{info['id']}/segments"
    for p in range(0, 48, 16):
        assert post(client, url, segment(x, p, 16)).status_code == 200
    tokens = [f"t{i}" for i in range(16)]
    body = segment(x, 48, 16, return_weights=True, heatmap={"heads": [1], "tokens": tokens})
    r = post(client, url, body)
    assert r.status_code == 200, r.text
    out = r.json()
    w = decode(out["weights"])
    # Keys [2 slots | 32 raw | 16 segment]; causal inside the segment; rows sum to 1.
    assert out["memory"] == {"raw": 32, "compressed": 2} and w.shape == (2, 16, 50)
    np.testing.assert_allclose(w.sum(-1), 1, atol=1e-5)
    seg = w[..., 34:]
    lower = np.tril(np.ones((16, 16), bool))
    assert (seg[:, ~lower] == 0).all() and (seg[:, lower] > 0).all()
    (image,) = out["heatmaps"]
    assert image["head"] == 1
    png = client.get(image["url"])
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).format == "PNG"
    # Token labels count the segment's positions only.
    bad = post(client, url, segment(x, 0, 16, heatmap={"tokens": tokens[:3]}))
    assert_problem(bad, 422, ["heatmap", "tokens"])


def test_bad_input_leaves_the_session_unchanged(client) -> None:
    info = open_session(client)
    url = f"/v1/sessions/{info['id']}/segments"
    x = qkv(4, 32, (2,))
    assert post(client, url, segment(x, 0, 16)).status_code == 200
    cases = [
        (segment([a[:1] for a in x], 16, 16), ["q"]),  # heads change
        (segment(x, 16, 12), ["q"]),  # not a multiple of the rate
        (segment(x, 16, 16) | {"k": x[1][:, :8].copy(), "v": x[2][:, :8].copy()}, ["k"]),
        (segment(x, 16, 16) | {"v": np.zeros((2, 16, 3), np.float32)}, ["v"]),
        (segment(x, 16, 16) | {"extra": 1}, ["extra"]),
        (segment(x, 16, 16, heatmap={"heads": [5]}), ["heatmap", "heads"]),
    ]
    for body, loc in cases:
        assert_problem(post(client, url, body), 422, loc)
    assert client.get(f"/v1/sessions/{info['id']}").json()["position"] == 16


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"memory": {"length": 6, "compressed": 2, "rate": 4}}, ["memory", "rate"]),
        ({"memory": {"length": 8, "compressed": 2}}, ["memory", "rate"]),
        ({"memory": {"length": -1}}, ["memory", "length"]),
        ({"memory": {"length": 8, "segment": 8}}, ["memory", "segment"]),
        ({"memory": {"length": 8, "pool": "sum"}}, ["memory", "pool"]),
        ({}, ["memory"]),
        ({"memory": {"length": 8}, "ttl_s": 0}, ["ttl_s"]),
        ({"memory": {"length": 8}, "ttl_s": 10**6}, ["ttl_s"]),
        ({"memory": {"length": 8}, "window": {"left": 1}}, ["window"]),
    ],
)
def test_bad_options_are_refused(client, body: dict[str, Any], loc: list[str]) -> None:
    assert_problem(post(client, "/v1/sessions", body), 422, loc)


def test_the_memory_option_on_v1(client) -> None:
    x = qkv(5, 100, (2,))
    mem = {"segment": 20, "length": 20, "compressed": 2, "rate": 5, "pool": "max"}
    body = {"q": b64(x[0]), "k": b64(x[1]), "v": b64(x[2]), "memory": mem, "return_weights": True}
    r = post(client, "/v1/attention", body)
    assert r.status_code == 200, r.text
    out = {k: decode(v) for k, v in r.json().items() if k in ("output", "weights", "slot_weights")}
    want = service.attention(*x, memory=mem, return_weights=True)
    np.testing.assert_array_equal(out["output"], want.output)
    np.testing.assert_array_equal(out["weights"], want.weights)
    np.testing.assert_array_equal(out["slot_weights"], want.slot_weights)
    assert out["slot_weights"].shape == (2, 100, 20)
    r = post(client, "/v1/attention", {**body, "return_weights": False, "heatmap": True})
    assert r.status_code == 200 and len(r.json()["heatmaps"]) == 4  # 2 heads, mean, grid
    for extra, loc in [
        ({"window": {"right": 2}}, ["window", "right"]),
        ({"stats": True}, ["stats"]),
        ({"alibi_slopes": True}, ["alibi_slopes"]),
        ({"memory": {**mem, "rate": 3}}, ["memory", "rate"]),
        ({"k": b64(x[1][:, :50].copy()), "v": b64(x[2][:, :50].copy())}, ["k"]),
    ]:
        assert_problem(post(client, "/v1/attention", {**body, **extra}), 422, loc)


def test_a_stale_segment_is_refused_with_409(client) -> None:
    # Two appends read the same state; the one replacing it second finds it moved on.
    state = client.app.state.services
    info = open_session(client)
    x = qkv(6, 32, (2,))
    stale = sessions.load(state, "", info["id"])
    assert post(client, f"/v1/sessions/{info['id']}/segments", segment(x, 0, 16)).status_code == 200
    with pytest.raises(sessions.SessionConflict, match="was not appended"):
        sessions.append_segment(state, stale, *segment(x, 16, 16).values(), return_weights=False,
                                spec=None)  # fmt: skip
    got = client.get(f"/v1/sessions/{info['id']}").json()
    assert got["position"] == 16  # the stale segment left nothing


def test_expiry(tmp_path, store_backend) -> None:
    with app_client(tmp_path, session_ttl_s=1, **store_backend.settings()) as c:
        info = open_session(c)
        assert info["ttl_s"] == 1
        x = qkv(7, 16, (1,))
        assert post(c, f"/v1/sessions/{info['id']}/segments", segment(x, 0, 8)).status_code == 200
        time.sleep(1.2)
        assert_problem(c.get(f"/v1/sessions/{info['id']}"), 404)
        assert_problem(post(c, f"/v1/sessions/{info['id']}/segments", segment(x, 8, 8)), 404)


def test_at_most_session_max_sessions(tmp_path, store_backend) -> None:
    with app_client(tmp_path, session_max=2, retry_after_s=3, **store_backend.settings()) as c:
        short = open_session(c, ttl_s=1)
        open_session(c)
        full = post(c, "/v1/sessions", {"memory": SPEC})
        assert_problem(full, 503)
        assert full.headers["retry-after"] == "3"
        assert "ATTN_SESSION_MAX" in full.json()["detail"]
        assert c.delete(f"/v1/sessions/{short['id']}").status_code == 204
        open_session(c, ttl_s=1)
        time.sleep(1.2)  # an expired session no longer counts
        open_session(c)


def test_a_session_belongs_to_its_api_key(tmp_path, store_backend) -> None:
    keys = ("alpha-key-0123456789", "beta-key-9876543210")
    alpha, beta = ({"authorization": f"Bearer {k}"} for k in keys)
    with app_client(tmp_path, api_keys=keys, **store_backend.settings()) as c:
        r = c.post("/v1/sessions", json={"memory": SPEC}, headers=alpha)
        assert r.status_code == 201
        sid = r.json()["id"]
        x = qkv(8, 16, (1,))
        body = {k: v.tolist() for k, v in segment(x, 0, 8).items()}
        assert_problem(c.get(f"/v1/sessions/{sid}", headers=beta), 404)
        assert_problem(c.post(f"/v1/sessions/{sid}/segments", json=body, headers=beta), 404)
        assert_problem(c.delete(f"/v1/sessions/{sid}", headers=beta), 404)
        assert c.post(f"/v1/sessions/{sid}/segments", json=body, headers=alpha).status_code == 200
        assert c.get(f"/v1/sessions/{sid}", headers=alpha).json()["position"] == 8
        assert c.get(f"/v1/sessions/{sid}").status_code == 401
        assert c.delete(f"/v1/sessions/{sid}", headers=alpha).status_code == 204
