"""Security: optional API keys on every /v1 and /v2 route, the per-caller rate limit, CORS, and
the docs page served without any external URL."""

from __future__ import annotations

import hmac
import re
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.routing import APIRoute

from service.web import health, v1, viewer
from service.web.app import create_app
from service.web.ratelimit import LocalRateLimiter
from service.web.settings import Settings
from service.web.v2 import routes as v2
from tests.support.http import app_client, app_settings, assert_problem, post

KEYS = "alpha-key-0123456789,beta-key-9876543210"
GOOD = {"authorization": "Bearer beta-key-9876543210"}
QKV = {"q": np.eye(2).tolist(), "k": np.eye(2).tolist(), "v": [[1.0, 2.0], [3.0, 4.0]]}
V2 = orjson.dumps(
    {
        "inputs": [
            {"name": n, "shape": [2, 2], "datatype": "FP32", "data": [1, 0, 0, 1]}
            for n in ("q", "k", "v")
        ]
    }
)
OPEN_PATHS = [
    "/healthz",
    "/readyz",
    "/metrics",
    "/v2/health/live",
    "/v2/health/ready",
    "/",
    "/static/viewer.js",
    "/docs",
    "/openapi.json",
    "/docs/assets/swagger-ui.css",
]
_PARAMS = {
    "model_name": "attention",
    "model_version": "1",
    "heatmap_id": "AAAAAAAAAAAAAAAAAAAAAA",
    "session_id": "AAAAAAAAAAAAAAAAAAAAAA",
}


def _api_requests(tmp_path: Path) -> list[tuple[str, str]]:
    """(method, concrete path) of every /v1 and /v2 route except the v2 health probes: from
    every router of the service (hidden routes included) and from the app's schema."""
    routes = [
        r
        for router in (*v1.ROUTERS, health.router, v2.router, v2.health_router, viewer.router)
        for r in router.routes
        if isinstance(r, APIRoute)
    ]
    found = {(m, r.path) for r in routes for m in r.methods}
    schema = create_app(app_settings(tmp_path)).openapi()
    found |= {(m.upper(), path) for path, ops in schema["paths"].items() for m in ops}
    return sorted(
        (method, path.format(**_PARAMS))
        for method, path in found
        if path.startswith(("/v1", "/v2")) and not path.startswith("/v2/health/")
    )


def _assert_401(r: Any, path: str, error: str | None = None) -> None:
    assert r.status_code == 401, (path, r.status_code, r.text)
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    if error:
        assert f'error="{error}"' in challenge
    if r.request.method == "HEAD":
        return
    if path.startswith("/v2"):
        assert r.headers["content-type"] == "application/json" and set(r.json()) == {"error"}
    else:
        assert_problem(r, 401)


# ---------------------------------------------------------------------------------------------
# API keys


def test_without_keys_the_api_is_open(tmp_path: Path) -> None:
    with app_client(tmp_path) as c:
        assert post(c, "/v1/attention", QKV).status_code == 200
        assert c.post("/v2/models/attention/infer", content=V2).status_code == 200


def test_every_api_route_needs_a_key(tmp_path: Path) -> None:
    requests = _api_requests(tmp_path)
    paths = {p for _, p in requests}
    # The enumeration covers every front, heatmap images (GET and HEAD) included.
    assert {"/v1/attention", "/v1/multihead", "/v1/tokens", "/v2"} <= paths
    assert ("HEAD", "/v1/heatmaps/AAAAAAAAAAAAAAAAAAAAAA.png") in requests
    assert ("POST", "/v2/models/attention/versions/1/infer") in requests
    assert ("POST", "/v1/sessions/AAAAAAAAAAAAAAAAAAAAAA/segments") in requests
    with app_client(tmp_path, api_keys=KEYS) as c:
        for method, path in requests:
            _assert_401(c.request(method, path), path)
            wrong = c.request(method, path, headers={"authorization": "Bearer alpha-key-012345"})
            _assert_401(wrong, path, error="invalid_token")
            # With a key the route answers as it would without authentication.
            assert c.request(method, path, headers=GOOD).status_code != 401, (method, path)


def test_health_metrics_docs_and_the_viewer_stay_open(tmp_path: Path) -> None:
    with app_client(tmp_path, api_keys=KEYS) as c:
        for path in OPEN_PATHS:
            r = c.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])


def test_each_key_is_accepted_and_the_scheme_is_case_insensitive(tmp_path: Path) -> None:
    with app_client(tmp_path, api_keys=KEYS) as c:
        for header in ("Bearer alpha-key-0123456789", "bearer beta-key-9876543210"):
            r = c.post("/v1/attention", json=QKV, headers={"authorization": header})
            assert r.status_code == 200, (header, r.text)
        basic = c.post("/v1/attention", json=QKV, headers={"authorization": "Basic YTpi"})
        _assert_401(basic, "/v1/attention")
        assert "Bearer <key>" in basic.json()["detail"]
        # A key followed by junk, or a key's prefix, is not the key.
        for token in ("beta-key-9876543210x", "beta-key-987654321", ""):
            r = c.post("/v1/attention", json=QKV, headers={"authorization": f"Bearer {token}"})
            _assert_401(r, "/v1/attention")


def test_heatmap_images_need_the_key_too(tmp_path: Path) -> None:
    with app_client(tmp_path, api_keys=KEYS) as c:
        r = c.post("/v1/attention", json={**QKV, "heatmap": True}, headers=GOOD)
        assert r.status_code == 200, r.text
        url = r.json()["heatmaps"][0]["url"]
        assert c.get(url, headers=GOOD).content.startswith(b"\x89PNG")
        # An existing image is refused exactly like an unknown one: nothing is revealed.
        _assert_401(c.get(url), url)
        _assert_401(c.head(url), url)


def test_every_key_is_compared_in_constant_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    with app_client(tmp_path, api_keys="k-one,k-two-longer,k-three") as c:
        r = c.post("/v1/attention", json=QKV, headers={"authorization": "Bearer k-one"})
        assert r.status_code == 200
        # The first key matched, yet all three were compared; always as fixed-length digests,
        # so neither the matching key nor any key's length shows in the time taken.
        assert compared == [(32, 32)] * 3
        compared.clear()
        c.post("/v1/attention", json=QKV, headers={"authorization": "Bearer x"})
        assert compared == [(32, 32)] * 3


def test_keys_come_from_the_environment_and_never_show(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTN_API_KEYS", " s3cret-one , s3cret-two,, ")
    monkeypatch.setenv("ATTN_CORS_ORIGINS", "https://a.example, https://b.example")
    s = Settings()
    assert [k.get_secret_value() for k in s.api_keys] == ["s3cret-one", "s3cret-two"]
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert "s3cret" not in repr(s) and "s3cret" not in str(s.model_dump())
    assert Settings(api_keys="", cors_origins="").api_keys == ()


def test_the_openapi_schema_documents_the_bearer_scheme(tmp_path: Path) -> None:
    with app_client(tmp_path, api_keys=KEYS) as c:
        spec = c.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["HTTPBearer"]["description"],
    }
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if path.startswith("/v2/health") or not path.startswith(("/v1", "/v2")):
                assert "security" not in op, (method, path)
                continue
            assert op["security"] == [{"HTTPBearer": []}], (method, path)
            assert {"401", "429"} <= set(op["responses"]), (method, path)
    # Without keys the same schema says credentials are optional.
    with app_client(tmp_path) as c:
        op = c.get("/openapi.json").json()["paths"]["/v1/attention"]["post"]
    assert op["security"] == [{"HTTPBearer": []}, {}]


# ---------------------------------------------------------------------------------------------
# Rate limit


def test_the_rate_limit_is_per_key_and_answers_429_with_retry_after(tmp_path: Path) -> None:
    with app_client(tmp_path, api_keys=KEYS, rate_limit=3) as c:
        for _ in range(3):
            assert c.post("/v1/attention", json=QKV, headers=GOOD).status_code == 200
        r = c.post("/v1/multihead", json={"query": [[1.0, 2.0]], "num_heads": 1}, headers=GOOD)
        problem = assert_problem(r, 429)
        assert "ATTN_RATE_LIMIT" in problem["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 20  # one request's worth at 3 per minute
        v2 = c.post("/v2/models/attention/infer", content=V2, headers=GOOD)
        assert v2.status_code == 429 and set(v2.json()) == {"error"}
        assert v2.headers["retry-after"]
        # Another key has its own budget; reads and health checks are not counted.
        other = {"authorization": "Bearer alpha-key-0123456789"}
        assert c.post("/v1/attention", json=QKV, headers=other).status_code == 200
        assert c.get("/v2/models/attention", headers=GOOD).status_code == 200
        assert c.get("/healthz").status_code == 200
        # A request without a valid key is refused before it can use anyone's budget.
        _assert_401(c.post("/v1/attention", json=QKV), "/v1/attention")


def test_without_keys_the_rate_limit_is_per_client_address(tmp_path: Path) -> None:
    with app_client(tmp_path, rate_limit=2) as c:
        assert [post(c, "/v1/attention", QKV).status_code for _ in range(3)] == [200, 200, 429]


def test_the_token_bucket_refills_at_the_rate_and_bounds_its_table() -> None:
    now = [0.0]
    limiter = LocalRateLimiter(per_minute=60, burst=2, clock=lambda: now[0], max_callers=3)
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 0
    assert limiter.acquire("a") == pytest.approx(1.0)  # one per second
    now[0] += 0.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.acquire("a") == 0
    assert limiter.acquire("b") == 0  # callers are independent
    # Many callers: the table never holds more than max_callers.
    for i in range(50):
        now[0] += 0.01
        assert limiter.acquire(f"ip-{i}") == 0
        assert len(limiter._buckets) <= 3


# ---------------------------------------------------------------------------------------------
# CORS


def _preflight(c: Any, origin: str) -> Any:
    return c.options(
        "/v1/attention",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type",
        },
    )


def test_cors_is_off_by_default(tmp_path: Path) -> None:
    with app_client(tmp_path) as c:
        assert "access-control-allow-origin" not in _preflight(c, "https://a.example").headers
        r = c.post("/v1/attention", json=QKV, headers={"origin": "https://a.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_the_configured_origins_only(tmp_path: Path) -> None:
    with app_client(tmp_path, cors_origins="https://a.example", api_keys=KEYS) as c:
        ok = _preflight(c, "https://a.example")
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://a.example"
        assert "authorization" in ok.headers["access-control-allow-headers"].lower()
        assert "access-control-allow-origin" not in _preflight(c, "https://evil.example").headers
        # Errors carry the headers too, so that the page can read why (and when to retry).
        r = c.post("/v1/attention", json=QKV, headers={"origin": "https://a.example"})
        assert r.status_code == 401
        assert r.headers["access-control-allow-origin"] == "https://a.example"
        exposed = r.headers["access-control-expose-headers"].lower()
        assert "retry-after" in exposed and "www-authenticate" in exposed
        r = c.post("/v1/attention", json=QKV, headers={"origin": "https://evil.example", **GOOD})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------------------------------------
# /docs without a CDN


def test_docs_reference_no_external_url(tmp_path: Path) -> None:
    with app_client(tmp_path) as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "swagger" in page.text.lower()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page.text, re.IGNORECASE)
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert len(refs) >= 3  # the script, the stylesheet, the icon
        for ref in refs:
            assert ref.startswith("/docs/assets/"), ref
            assert c.get(ref).status_code == 200, ref
        assert (
            c.get("/docs/assets/swagger-ui-bundle.js")
            .headers["content-type"]
            .startswith(("text/javascript", "application/javascript"))
        )
        # The page loads the schema from this service too, and ReDoc (CDN-only) is not served.
        assert "url: '/openapi.json'" in page.text
        assert c.get("/redoc").status_code == 404
        assert c.get("/docs/oauth2-redirect").status_code == 200
