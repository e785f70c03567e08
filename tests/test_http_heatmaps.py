"""Heatmaps: rendering, the bounded store, and GET /v1/heatmaps/{id}.png with caching."""

from __future__ import annotations

import base64
import io
import multiprocessing
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from http_support import assert_problem, b64, client, decode, post
from PIL import Image

from service.errors import LimitError
from service.heatmaps import render_grid, render_map
from service.store import ID_PATTERN, HeatmapStore


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def qkv(h: int = 4, lq: int = 6, lk: int = 6) -> dict[str, Any]:
    rng = np.random.default_rng(h * 100 + lq)
    q = rng.standard_normal((1, h, lq, 8)).astype(np.float32)
    k = rng.standard_normal((1, h, lk, 8)).astype(np.float32)
    return {"q": b64(q), "k": b64(k), "v": b64(k)}


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with client(tmp_path_factory.mktemp("heatmaps"), heatmap_max_images=6) as test_client:
        yield test_client


# ---------------------------------------------------------------------------------------------
# Rendering


def test_render_map_is_a_png_with_or_without_labels() -> None:
    m = np.random.default_rng(0).random((12, 9)).astype(np.float32)
    plain = render_map(m, title="t")
    labelled = render_map(
        m, title="t", xlabels=[f"k{i}" for i in range(9)], ylabels=[f"q{i}" for i in range(12)]
    )
    assert png_size(plain) == png_size(labelled) == (640, 540)
    assert plain != labelled
    signed = render_map(m - 0.5, title="pe", xlabel="dimension", ylabel="position", diverging=True)
    assert png_size(signed) == (640, 540)


def test_render_handles_nan_and_constant_maps() -> None:
    m = np.full((4, 4), np.nan, np.float32)
    assert png_size(render_map(m, title="nan")) == (640, 540)
    assert png_size(render_map(np.zeros((3, 5), np.float32), title="zeros")) == (640, 540)
    assert png_size(render_map(np.ones((1, 1), np.float32), title="one")) == (640, 540)


def test_rendering_in_threads_equals_rendering_in_sequence() -> None:
    # Each worker thread keeps its own figure: concurrent renders must not interfere.
    rng = np.random.default_rng(1)
    maps = [rng.random((16, 16)).astype(np.float32) for _ in range(12)]
    sequential = [render_map(m, title=f"m{i}") for i, m in enumerate(maps)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda im: render_map(im[1], title=f"m{im[0]}"), enumerate(maps)))
    assert threaded == sequential


def test_grid_has_one_panel_per_head() -> None:
    maps = np.random.default_rng(2).random((5, 8, 8)).astype(np.float32)
    w, h = png_size(render_grid(maps, [f"head {i}" for i in range(5)], title="grid"))
    assert w > 0 and h > 0


# ---------------------------------------------------------------------------------------------
# Requests and fetching


def test_fetch_with_etag_and_cache_headers(c) -> None:
    res = post(c, "/v1/attention", {**qkv(1), "heatmap": True}).json()
    (ref,) = res["heatmaps"]
    assert ID_PATTERN.fullmatch(ref["id"]) and ref["url"] == f"/v1/heatmaps/{ref['id']}.png"
    assert (ref["batch"], ref["head"]) == (0, 0)
    r = c.get(ref["url"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert png_size(r.content) == (640, 540)
    etag = r.headers["etag"]
    assert etag.startswith('"') and "max-age=" in r.headers["cache-control"]
    again = c.get(ref["url"], headers={"if-none-match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    assert c.get(ref["url"], headers={"if-none-match": '"other", ' + etag}).status_code == 304
    assert c.get(ref["url"], headers={"if-none-match": "*"}).status_code == 304
    assert c.get(ref["url"], headers={"if-none-match": '"other"'}).status_code == 200


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
def test_unknown_or_malformed_ids_are_404(c, path: str) -> None:
    assert_problem(c.get(path), 404)


def test_heads_selection(c) -> None:
    def heads(spec: Any, h: int = 4) -> list[Any]:
        r = post(c, "/v1/attention", {**qkv(h), "heatmap": spec})
        assert r.status_code == 200, r.text
        return [x["head"] for x in r.json()["heatmaps"]]

    assert heads(True) == [0, 1, 2, 3, "mean", "all"]
    assert heads({"heads": [2]}) == [2]
    assert heads({"heads": [3, 1, 3]}) == [3, 1, "all"]
    assert heads({"heads": "mean"}) == ["mean"]
    assert heads(True, h=1) == [0]


def test_inline_images_are_base64_pngs_not_stored(tmp_path: Path) -> None:
    with client(tmp_path) as c2:
        r = post(c2, "/v1/attention", {**qkv(2), "heatmap": {"inline": True, "heads": [0, 1]}})
        refs = r.json()["heatmaps"]
        assert [x["head"] for x in refs] == [0, 1, "all"]
        for ref in refs:
            assert "id" not in ref and "url" not in ref
            assert png_size(base64.b64decode(ref["png"]))[0] > 0
        assert not list((tmp_path / "heatmaps").glob("*.png"))


def test_heatmap_does_not_change_the_results(c) -> None:
    body = {**qkv(2), "return_weights": True}
    plain = post(c, "/v1/attention", body).json()
    drawn = post(c, "/v1/attention", {**body, "heatmap": True}).json()
    np.testing.assert_array_equal(decode(plain["output"]), decode(drawn["output"]))
    np.testing.assert_array_equal(decode(plain["weights"]), decode(drawn["weights"]))
    hidden = post(c, "/v1/attention", {**qkv(2), "heatmap": True}).json()
    assert "weights" not in hidden  # drawn from weights, but not returned unless asked


def test_nan_rows_can_be_drawn(c) -> None:
    body = {**qkv(1), "key_lengths": [0], "empty_rows": "nan", "heatmap": True}
    r = post(c, "/v1/attention", body)
    assert r.status_code == 200, r.text
    assert c.get(r.json()["heatmaps"][0]["url"]).status_code == 200


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
def test_bad_heatmap_requests_are_422(c, spec: Any, loc: list, words: str) -> None:
    h = 5 if spec is True else 4  # 5 heads + mean + grid = 7 images > 6
    body = assert_problem(post(c, "/v1/attention", {**qkv(h), "heatmap": spec}), 422, loc)
    assert words.lower() in body["detail"].lower()


def test_expired_images_are_404(tmp_path: Path) -> None:
    with client(tmp_path, heatmap_ttl_s=60) as c2:
        ref = post(c2, "/v1/attention", {**qkv(1), "heatmap": True}).json()["heatmaps"][0]
        assert c2.get(ref["url"]).status_code == 200
        old = time.time() - 120
        os.utime(tmp_path / "heatmaps" / f"{ref['id']}.png", (old, old))
        assert_problem(c2.get(ref["url"]), 404)


# ---------------------------------------------------------------------------------------------
# The store


def test_store_bounds_count_and_evicts_oldest_first(tmp_path: Path) -> None:
    store = HeatmapStore(tmp_path, max_bytes=10_000, max_count=3, ttl_s=60)
    ids = []
    for i in range(5):
        ids.append(store.put(bytes([i]) * 100))
        path = tmp_path / f"{ids[-1]}.png"
        os.utime(path, (time.time() - 50 + i, time.time() - 50 + i))  # distinct ages
    assert len(set(ids)) == 5 and all(ID_PATTERN.fullmatch(i) for i in ids)
    assert [store.get(i) is not None for i in ids] == [False, False, True, True, True]
    assert store.get(ids[4]).data == bytes([4]) * 100


def test_store_bounds_bytes_and_drops_expired(tmp_path: Path) -> None:
    store = HeatmapStore(tmp_path, max_bytes=250, max_count=100, ttl_s=60)
    a = store.put(b"a" * 100)
    os.utime(tmp_path / f"{a}.png", (time.time() - 10, time.time() - 10))
    b = store.put(b"b" * 100)
    c = store.put(b"c" * 100)  # 300 bytes would exceed 250: the oldest goes
    assert store.get(a) is None and store.get(b) and store.get(c)
    os.utime(tmp_path / f"{b}.png", (time.time() - 100, time.time() - 100))
    store.put(b"d")
    assert not (tmp_path / f"{b}.png").exists()  # expired files are deleted on the next put
    with pytest.raises(LimitError):
        store.put_many([b"x" * 200, b"y" * 200])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _writer(directory: str, n: int) -> int:
    store = HeatmapStore(Path(directory), max_bytes=50_000, max_count=10, ttl_s=60)
    for i in range(n):
        store.put(os.urandom(1000 + i))
    return n


def test_store_limits_hold_with_concurrent_writers_and_readers(tmp_path: Path) -> None:
    store = HeatmapStore(tmp_path, max_bytes=50_000, max_count=10, ttl_s=60)
    with ThreadPoolExecutor(6) as pool:
        puts = [pool.submit(store.put, os.urandom(1000)) for _ in range(60)]
        ids = [f.result() for f in puts]
        gets = list(pool.map(store.get, ids))
    assert all(g is None or len(g.data) == 1000 for g in gets)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(3) as procs:
        assert sum(procs.starmap(_writer, [(str(tmp_path), 15)] * 3)) == 45
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) <= 10 and sum(p.stat().st_size for p in pngs) <= 50_000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_degenerate_shapes_draw_or_refuse_cleanly(c) -> None:
    no_queries = np.ones((0, 4), np.float32)
    keys = np.ones((3, 4), np.float32)
    r = post(
        c, "/v1/attention", {"q": b64(no_queries), "k": b64(keys), "v": b64(keys), "heatmap": True}
    )
    assert r.status_code == 200, r.text
    assert c.get(r.json()["heatmaps"][0]["url"]).status_code == 200
    no_heads = np.ones((1, 0, 3, 4), np.float32)
    body = {"q": b64(no_heads), "k": b64(no_heads), "v": b64(no_heads)}
    assert_problem(
        post(c, "/v1/attention", {**body, "heatmap": {"heads": "mean"}}), 422, ["heatmap"]
    )
    assert post(c, "/v1/attention", body).status_code == 200


def test_head_and_wrong_methods_on_images(c) -> None:
    ref = post(c, "/v1/attention", {**qkv(1), "heatmap": True}).json()["heatmaps"][0]
    head = c.head(ref["url"])
    assert head.status_code == 200 and head.headers["content-type"] == "image/png"
    assert head.headers["etag"] == c.get(ref["url"]).headers["etag"]
    r = c.post(ref["url"])
    assert_problem(r, 405)
    assert "GET" in r.headers["allow"]
