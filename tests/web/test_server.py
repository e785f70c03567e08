"""The real server: `attention-service` started on a free port, spoken to over the network."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

import service
from service.client import AttentionClient, ServiceError
from tests.support.http import Server, console_script

# The `server` fixture's environment (tests/conftest.py).
SERVER_ENV = {
    "ATTN_MAX_BODY_BYTES": "1000000",
    "ATTN_PORT": "1",  # the --port flag must win over the environment
}


def test_client_round_trip_over_the_network(server: Server) -> None:
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 16, 8)).astype(np.float32)
    with AttentionClient(server.url) as client:
        res = client.attention(q, q, q, causal=True, return_weights=True, heatmap=True)
        expected = service.attention(q, q, q, causal=True, return_weights=True)
        np.testing.assert_array_equal(res.output, expected.output)
        np.testing.assert_array_equal(res.weights, expected.weights)
        np.testing.assert_array_equal(res.lse, expected.lse)
        assert res.meta["shape"] == [2, 16, 8]
        assert [h["head"] for h in res.heatmaps] == [0, 1, "mean", "all"]
        png = client.heatmap(res.heatmaps[0]["id"])
        assert png.startswith(b"\x89PNG") and png == client.heatmap(res.heatmaps[0]["url"])

        x = rng.standard_normal((1, 5, 8)).astype(np.float32)
        mh = client.multihead(x, num_heads=2, seed=4, need_weights=True)
        api = service.multihead_attention(x, num_heads=2, seed=4, need_weights=True)
        np.testing.assert_array_equal(mh.output, api.output)
        np.testing.assert_array_equal(mh.weights, api.weights)
        assert mh.meta["param_count"] == api.param_count

        tok = client.tokens("the cat sat on the mat", d_model=16, num_heads=4, heatmap=False)
        assert tok.raw["tokens"] == ["the", "cat", "sat", "on", "the", "mat"]
        assert tok.output.shape == (6, 16) and tok.weights.shape == (4, 6, 6)


def test_client_errors_carry_the_problem(server: Server) -> None:
    with AttentionClient(server.url) as client:
        with pytest.raises(ServiceError) as info:
            client.attention(np.ones((3, 4)), np.ones((3, 5)), np.ones((3, 5)))
        err = info.value
        assert err.status == 422 and err.errors[0]["loc"] == ["k"]
        assert "k" in str(err) and err.title == "Invalid input"
        with pytest.raises(ServiceError) as info:
            client.heatmap("AAAAAAAAAAAAAAAAAAAAAA")
        assert info.value.status == 404


def test_limits_and_problems_over_the_network(server: Server) -> None:
    big = b"[" + b"1.0," * 400_000 + b"1.0]"
    r = httpx.post(
        server.url + "/v1/attention", content=big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.headers["content-type"] == "application/problem+json"

    def chunks() -> Iterator[bytes]:
        for _ in range(200):
            yield b" " * 10_000

    json = {"content-type": "application/json"}
    r = httpx.post(server.url + "/v1/attention", content=chunks(), headers=json)
    assert r.status_code == 413
    r = httpx.get(server.url + "/v1/attention")
    assert r.status_code == 405 and r.json()["status"] == 405
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert "attention_http_requests_total" in httpx.get(server.url + "/metrics").text
    assert httpx.get(server.url + "/docs").status_code == 200


def test_console_script_help() -> None:
    out = subprocess.run(
        [console_script(), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--host", "--port", "--workers", "ATTN_PORT"):
        assert flag in out


def test_console_script_names_an_invalid_setting() -> None:
    env = {**os.environ, "ATTN_MAX_CONCURRENCY": "0"}
    run = subprocess.run([console_script()], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "ATTN_MAX_CONCURRENCY" in run.stderr


def test_the_ray_command_has_its_flags_and_refuses_bad_values() -> None:
    out = subprocess.run(
        [console_script(), "ray", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in ("--replicas", "--min-replicas", "--max-replicas", "--replica-cpus", "RAY_ADDRESS"):
        assert flag in out
    for args, message in (
        (["--replicas", "0"], "--replicas must be >= 1"),
        (["--min-replicas", "3", "--max-replicas", "2"], "must not exceed"),
        (["--replica-cpus", "0"], "--replica-cpus must be > 0"),
    ):
        run = subprocess.run([console_script(), "ray", *args], capture_output=True, text=True)
        assert run.returncode != 0 and message in run.stderr, run.stderr
