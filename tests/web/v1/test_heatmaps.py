"""Heatmaps over HTTP: which images a request draws, inline or stored, and
GET /v1/heatmaps/{id}.png with caching (tests/render draws, tests/web/test_store.py stores)."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.web.store import ID_PATTERN
from tests.support.http import app_client, assert_problem, b64, decode, post
from tests.support.images import png_size


def qkv(h: int = 4, lq: int = 6, lk: int = 6) -> dict[str, Any]:
    rng = np.random.default_rng(h * 100 + lq)
    q = rng.standard_normal((1, h, lq, 8)).astype(np.float32)
    k = rng.standard_normal((1, h, lk, 8)).astype(np.float32)
    return {"q": b64(q), "k": b64(k), "v": b64(k)}


# Settings of this module's `client` fixture (tests/conftest.py).
APP_SETTINGS = {"heatmap_max_images": 6}


# ---------------------------------------------------------------------------------------------
# Requests and fetching


def test_fetch_with_etag_and_cache_headers(client) -> None:
    res = post(client, "/v1/attention", {**qkv(1), "heatmap": True}).json()
    (ref,) = res["heatmaps"]
    assert ID_PATTERN.fullmatch(ref["id"]) and ref["url"] == f"/v1/heatmaps/{ref['id']}.png"
    assert (ref["batch"], ref["head"]) == (0, 0)
    r = client.get(ref["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png_size(r.content) == (640, 540)
    etag = r.headers["etag"]
    assert etag.startswith('"') and "max-age=" in r.headers["cache-control"]
    again = client.get(ref["url"], headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert client.get(ref["url"], headers={"if-none-match": '"other", ' + etag}).status_code == 304
    assert client.get(ref["url"], headers={"if-none-match": "*"}).status_code == 304
    assert client.get(ref["url"], headers={"if-none-match": '"other"'}).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/heatmaps/AAAAAAAAAAAAAAAAAAAAAA.png",  # well-formed, unknown
        "/v1/heatmaps/short.png",
        "/v1/heatmaps/..%2F..%2F..%2Fetc%2Fpasswd.png",
        "/v1/heatmaps/%2e%2e.png",
        "/v1/heatmaps/.lock.png",
        "/v1/heatmaps/AAAAAAAAAAAAAAAAAAAAAA.jpg",
    ],
)
def test_unknown_or_malformed_ids_are_404(client, path: str) -> None:
    assert_problem(client.get(path), 404)


def test_heads_selection(client) -> None:
    def heads(spec: Any, h: int = 4) -> list[Any]:
        r = post(client, "/v1/attention", {**qkv(h), "heatmap": spec})
        assert r.status_code == 200, r.text
        return [x["head"] for x in r.json()["heatmaps"]]

    assert heads(True) == [0, 1, 2, 3, "mean", "all"]
    assert heads({"heads": [2]}) == [2]
    assert heads({"heads": [3, 1, 3]}) == [3, 1, "all"]
    assert heads({"heads": "mean"}) == ["mean"]
    assert heads(True, h=1) == [0]


def test_inline_images_are_base64_pngs_not_stored(tmp_path: Path) -> None:
    with app_client(tmp_path) as c2:
        r = post(c2, "/v1/attention", {**qkv(2), "heatmap": {"inline": True, "heads": [0, 1]}})
        refs = r.json()["heatmaps"]
        assert [x["head"] for x in refs] == [0, 1, "all"]
        for ref in refs:
            assert "id" not in ref and "url" not in ref
            assert png_size(base64.b64decode(ref["png"]))[0] > 0
        assert not list((tmp_path / "heatmaps").glob("*.png"))


def test_heatmap_does_not_change_the_results(client) -> None:
    body = {**qkv(2), "return_weights": True}
    plain = post(client, "/v1/attention", body).json()
    drawn = post(client, "/v1/attention", {**body, "heatmap": True}).json()
    np.testing.assert_array_equal(decode(plain["output"]), decode(drawn["output"]))
    np.testing.assert_array_equal(decode(plain["weights"]), decode(drawn["weights"]))
    hidden = post(client, "/v1/attention", {**qkv(2), "heatmap": True}).json()
    assert "weights" not in hidden  # drawn from weights, but not returned unless asked


def test_nan_rows_can_be_drawn(client) -> None:
    body = {**qkv(1), "key_lengths": [0], "empty_rows": "nan", "heatmap": True}
    r = post(client, "/v1/attention", body)
    assert r.status_code == 200, r.text
    assert client.get(r.json()["heatmaps"][0]["url"]).status_code == 200


@pytest.mark.parametrize(
    ("spec", "loc", "words"),
    [
        ({"batch": 1}, ["heatmap", "batch"], "outside"),
        ({"heads": [4]}, ["heatmap", "heads"], "outside"),
        ({"heads": [-1]}, ["heatmap", "heads"], ">= 0"),
        ({"heads": []}, ["heatmap", "heads"], "empty"),
        ({"tokens": ["a", "b"]}, ["heatmap", "tokens"], "labels"),
        ({"inline": "maybe"}, ["heatmap", "inline"], "boolean"),
        ({"colour": "red"}, ["heatmap", "colour"], "extra"),
        (True, ["heatmap"], "ATTN_HEATMAP_MAX_IMAGES"),
    ],
)
def test_bad_heatmap_requests_are_422(client, spec: Any, loc: list, words: str) -> None:
    h = 5 if spec is True else 4  # 5 heads + mean + grid = 7 images > 6
    body = assert_problem(post(client, "/v1/attention", {**qkv(h), "heatmap": spec}), 422, loc)
    assert words.lower() in body["detail"].lower()


def test_expired_images_are_404(tmp_path: Path) -> None:
    with app_client(tmp_path, heatmap_ttl_s=60) as c2:
        ref = post(c2, "/v1/attention", {**qkv(1), "heatmap": True}).json()["heatmaps"][0]
        assert c2.get(ref["url"]).status_code == 200
        old = time.time() - 120
        os.utime(tmp_path / "heatmaps" / f"{ref['id']}.png", (old, old))
        assert_problem(c2.get(ref["url"]), 404)


def test_degenerate_shapes_draw_or_refuse_cleanly(client) -> None:
    no_queries = np.ones((0, 4), np.float32)
    keys = np.ones((3, 4), np.float32)
    r = post(
        client,
        "/v1/attention",
        {"q": b64(no_queries), "k": b64(keys), "v": b64(keys), "heatmap": True},
    )
    assert r.status_code == 200, r.text
    assert client.get(r.json()["heatmaps"][0]["url"]).status_code == 200
    no_heads = np.ones((1, 0, 3, 4), np.float32)
    body = {"q": b64(no_heads), "k": b64(no_heads), "v": b64(no_heads)}
    assert_problem(
        post(client, "/v1/attention", {**body, "heatmap": {"heads": "mean"}}), 422, ["heatmap"]
    )
    assert post(client, "/v1/attention", body).status_code == 200


def test_head_and_wrong_methods_on_images(client) -> None:
    ref = post(client, "/v1/attention", {**qkv(1), "heatmap": True}).json()["heatmaps"][0]
    head = client.head(ref["url"])
    assert head.status_code == 200 and head.headers["content-type"] == "image/png"
    assert head.headers["etag"] == client.get(ref["url"]).headers["etag"]
    r = client.post(ref["url"])
    assert_problem(r, 405)
    assert "GET" in r.headers["allow"]
