"""The web viewer at /, end to end in headless Chromium against the real server.

Debian's chromium is driven by Playwright (executable_path: browser downloads do not work here).
The browser tests are skipped only where /usr/bin/chromium is missing; `.ci/run` installs it.
Expected weights come from the service's JSON API given exactly the body the page sent (for the
tokens pipeline, whose weights the page only displays), or from the float64 torch reference (for
.npy uploads, which the page parses itself).

Artifacts: artifacts/viewer.png (every run). ATTN_UPDATE_SCREENSHOT=1 also refreshes the
README's tests/screenshots/viewer.png.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Browser, Locator, Page, Route, expect, sync_playwright

from tests.support.http import Server, app_client
from tests.support.reference import reference_attention

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts"
README_SCREENSHOT = REPO / "tests" / "screenshots" / "viewer.png"
CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="no Chromium at /usr/bin/chromium (apt-get install -y chromium; .ci/run does)",
)

SENTENCE = "the quick brown fox jumps over the lazy dog"
KEY_STORAGE = "attention-viewer.api-key"
# Four decimals are shown (or three significant digits below 0.001).
SHOWN = {"abs": 6e-5, "rel": 6e-3}


# ---------------------------------------------------------------------------------------------
# The server and the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("no Chromium at /usr/bin/chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Viewer:
    """A page on the viewer, with what went wrong in it (script errors, console errors)."""

    page: Page
    url: str
    errors: list[str] = field(default_factory=list)

    def open(self) -> None:
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("body[data-ready=true]")

    def submit(self, path: str = "/v1/tokens") -> dict[str, Any]:
        """Press the button; the JSON body of the page's first request to `path`."""
        with self.page.expect_request(lambda r: r.url.endswith(path) and r.method == "POST") as r:
            self.page.click("#submit")
        return r.value.post_data_json

    def tiles(self) -> Locator:
        return self.page.locator("#heads .tile")

    def wait_for_heads(self, count: int) -> None:
        self.page.wait_for_selector("#heads .tile[data-head='mean'] canvas")
        assert self.tiles().count() == count + 1

    def hover(self, canvas: Locator, i: int, j: int, lq: int, lk: int) -> dict[str, str]:
        """Move the mouse to the centre of cell (query i, key j); the tooltip's texts."""
        box = canvas.bounding_box()
        assert box is not None
        self.page.mouse.move(
            box["x"] + (j + 0.5) * box["width"] / lk, box["y"] + (i + 0.5) * box["height"] / lq
        )
        tip = self.page.locator("#tooltip")
        assert tip.is_visible()
        return {
            name: self.page.inner_text(f"#tt-{name}") for name in ("query", "key", "weight", "head")
        }

    def wait_for_server_png(self) -> None:
        self.page.wait_for_function(
            "() => { const i = document.getElementById('server-png');"
            " return !i.hidden && i.complete && i.naturalWidth > 0; }",
            timeout=90_000,
        )

    def pixel(self, canvas: Locator, i: int, j: int, lq: int, lk: int) -> tuple[int, int, int]:
        """The colour drawn at the centre of cell (i, j)."""
        rgba = canvas.evaluate(
            "(c, [i, j, lq, lk]) => Array.from(c.getContext('2d').getImageData("
            "Math.floor((j + 0.5) * c.width / lk), Math.floor((i + 0.5) * c.height / lq), 1, 1"
            ").data)",
            [i, j, lq, lk],
        )
        return tuple(rgba[:3])  # type: ignore[return-value]


@pytest.fixture
def viewer(browser: Browser, server: Server) -> Iterator[Viewer]:
    context = browser.new_context(viewport={"width": 1360, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    v = Viewer(page, server.url)
    page.on("pageerror", lambda exc: v.errors.append(f"page error: {exc}"))
    page.on(
        "console",
        lambda msg: (
            v.errors.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
        ),
    )
    try:
        yield v
    finally:
        context.close()


def _weight(text: str) -> float:
    return float(text)


def _viridis(x: float) -> tuple[int, int, int]:
    """matplotlib's viridis at x in [0, 1], as 8-bit RGB (the server's PNG colours)."""
    import matplotlib

    r, g, b, _ = matplotlib.colormaps["viridis"](x)
    return round(r * 255), round(g * 255), round(b * 255)


# ---------------------------------------------------------------------------------------------
# The page and its files, without a browser


def test_page_and_static_files_are_served(tmp_path: Path) -> None:
    with app_client(tmp_path) as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert c.head("/").status_code == 200
        # Everything the page loads comes from the service itself: no CDN.
        refs = set(re.findall(r'(?:src|href)="([^"]+)"', page.text))
        assert {"/static/viewer.js", "/static/viewer.css"} <= refs
        for ref in refs:
            assert ref.startswith("/"), ref
            assert c.get(ref).status_code == 200, ref
        js = c.get("/static/viewer.js")
        assert js.headers["content-type"].startswith("text/javascript")
        for name in ("api.js", "viewer.js", "viewer.css", "index.html"):
            text = c.get("/" if name == "index.html" else f"/static/{name}").text
            assert "http://" not in text and "https://" not in text, name
        missing = c.get("/static/nothing.js")
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"
        assert c.get("/static/..%2Fapp.py").status_code == 404
        assert c.get("/static/__init__.py").status_code == 404


# ---------------------------------------------------------------------------------------------
# In the browser


@needs_chromium
def test_sentence_heatmaps_hover_enlarge_download(viewer: Viewer, server: Server) -> None:
    page = viewer.page
    viewer.open()
    heads, tokens = 4, SENTENCE.split()
    n = len(tokens)
    page.fill("#text", SENTENCE)
    page.fill("#d_model", "32")
    page.fill("#num_heads", str(heads))
    page.select_option("#positional", "rope")
    page.select_option("#causal", "top_left")
    page.fill("#seed", "7")
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r) if r.url.endswith("/v1/tokens") else None)
    sent = viewer.submit()
    assert {
        k: sent[k] for k in ("text", "d_model", "num_heads", "positional", "causal", "seed")
    } == {
        "text": SENTENCE,
        "d_model": 32,
        "num_heads": heads,
        "positional": "rope",
        "causal": True,
        "seed": 7,
    }
    # The weights the page was given, asked for again with the same body.
    answer = httpx.post(server.url + "/v1/tokens", json={**sent, "encoding": "list"}, timeout=60)
    expected = np.array(answer.json()["weights"], dtype=np.float64)
    assert expected.shape == (heads, n, n)

    viewer.wait_for_heads(heads)
    assert [viewer.tiles().nth(h).get_attribute("data-head") for h in range(heads + 1)] == [
        *map(str, range(heads)),
        "mean",
    ]
    assert page.locator("#heads canvas").count() == heads + 1
    assert page.inner_text("#detail-title") == f"Mean of {heads} heads"

    # Drawn from the weights: causal row 0 puts all its weight on key 0 in every head (the
    # top of the colour scale), and nothing on the last key (the bottom).
    detail = page.locator("#detail-canvas")
    assert viewer.pixel(detail, 0, 0, n, n) == _viridis(1.0)
    assert viewer.pixel(detail, 0, n - 1, n, n) == _viridis(0.0)

    # Hover a cell of head 2's tile.
    tile2 = viewer.tiles().nth(2).locator("canvas")
    tip = viewer.hover(tile2, 5, 2, n, n)
    assert tip["query"].startswith(tokens[5]) and "#5" in tip["query"]
    assert tip["key"].startswith(tokens[2]) and "#2" in tip["key"]
    assert tip["head"] == "Head 2"
    assert _weight(tip["weight"]) == pytest.approx(expected[2, 5, 2], **SHOWN)

    # Click head 2: it is enlarged, with token labels, and its own values on hover.
    viewer.tiles().nth(2).click()
    assert page.inner_text("#detail-title") == "Head 2"
    assert viewer.tiles().nth(2).get_attribute("aria-pressed") == "true"
    assert page.locator("#key-labels .label-cell").all_inner_texts() == tokens
    assert page.locator("#query-labels .label-cell").all_inner_texts() == tokens
    tip = viewer.hover(detail, 6, 1, n, n)
    assert tip["query"].startswith(tokens[6]) and tip["key"].startswith(tokens[1])
    assert _weight(tip["weight"]) == pytest.approx(expected[2, 6, 1], **SHOWN)
    assert page.locator(".label-cell.hot").all_inner_texts() == [tokens[1], tokens[6]]
    assert _weight(viewer.hover(detail, 1, 7, n, n)["weight"]) == 0.0  # causal: masked

    # Beside it, the server's PNG of head 2, and a download link that gives that file.
    viewer.wait_for_server_png()
    assert "head 2" in (page.get_attribute("#server-png", "alt") or "")
    images = next(r.json() for r in responses if r.ok and r.json().get("heatmaps"))["heatmaps"]
    head2 = next(h for h in images if h["head"] == 2)
    with page.expect_download() as download:
        page.click("#png-download")
    assert download.value.suggested_filename == "attention-head-2.png"
    png = Path(download.value.path()).read_bytes()
    assert png == httpx.get(server.url + head2["url"], timeout=30).content
    assert Image.open(io.BytesIO(png)).format == "PNG"
    assert page.locator("#grid-download").is_visible()
    assert page.locator("#pe-download").is_visible()

    # The head-mean view.
    viewer.tiles().nth(heads).click()
    assert page.inner_text("#detail-title") == f"Mean of {heads} heads"
    tip = viewer.hover(detail, 7, 3, n, n)
    assert tip["head"] == f"Mean of {heads} heads"
    assert _weight(tip["weight"]) == pytest.approx(expected.mean(axis=0)[7, 3], **SHOWN)
    viewer.wait_for_server_png()
    assert "mean" in (page.get_attribute("#server-png", "alt") or "")

    ARTIFACTS.mkdir(exist_ok=True)
    viewer.hover(detail, 6, 2, n, n)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"), full_page=True)
    if os.environ.get("ATTN_UPDATE_SCREENSHOT"):
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(ARTIFACTS / "viewer.png", README_SCREENSHOT)
    assert Image.open(ARTIFACTS / "viewer.png").size[0] == 1360
    assert viewer.errors == []


@needs_chromium
def test_errors_appear_next_to_their_fields(viewer: Viewer) -> None:
    page = viewer.page
    viewer.open()
    page.fill("#d_model", "30")
    page.fill("#num_heads", "4")
    with page.expect_response(lambda r: r.url.endswith("/v1/tokens")) as answer:
        page.click("#submit")
    assert answer.value.status == 422
    [error] = answer.value.json()["errors"]
    assert error["loc"] == ["num_heads"]
    message = page.locator("#num_heads-error")
    message.wait_for()
    assert error["msg"].lower() in message.inner_text().lower()
    assert "divisible" in message.inner_text()
    assert page.get_attribute("#num_heads", "aria-invalid") == "true"
    assert page.locator("#form-error").is_hidden()
    assert page.locator("#result").is_hidden()

    # Fixed; now a negative window: the message moves to the window's left field.
    page.fill("#d_model", "32")
    page.fill("#window-left", "-1")
    with page.expect_response(lambda r: r.url.endswith("/v1/tokens")) as answer:
        page.click("#submit")
    assert answer.value.status == 422
    assert [e["loc"] for e in answer.value.json()["errors"]] == [["window", "left"]]
    left = page.locator("#window-left-error")
    left.wait_for()
    assert "greater than or equal to 0" in left.inner_text()
    assert page.get_attribute("#window-left", "aria-invalid") == "true"
    assert page.inner_text("#num_heads-error") == ""
    assert page.get_attribute("#num_heads", "aria-invalid") is None

    # What the page can tell by itself never reaches the service.
    page.fill("#window-left", "")
    page.fill("#global_tokens", "0, x")
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if "/v1/" in r.url else None)
    page.click("#submit")
    page.locator("#global_tokens-error").wait_for()
    assert "x" in page.inner_text("#global_tokens-error")
    assert sent == []
    # Console errors of the two 422 answers are the browser's own logging of them.
    assert [e for e in viewer.errors if "422" not in e] == []


@needs_chromium
def test_npy_upload_matches_the_float64_reference(viewer: Viewer, tmp_path: Path) -> None:
    page = viewer.page
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 5, 8)).astype("<f4")
    # Big-endian float64 in Fortran order, and integers: the page converts all of them.
    k = np.asfortranarray(rng.standard_normal((2, 6, 8)).astype(">f8"))
    v = rng.integers(-4, 5, (2, 6, 8)).astype("<i2")
    for name, arr in (("q", q), ("k", k), ("v", v)):
        np.save(tmp_path / f"{name}.npy", arr)
    labels = ["a", "b", "c", "d", "e", "f"]
    ref = (
        reference_attention(
            q[None], k[None], v.astype(np.float32)[None], causal="bottom_right", window={"left": 2}
        )
        .weights[0]
        .numpy()
    )

    viewer.open()
    page.click("#tab-qkv")
    for name in ("q", "k", "v"):
        page.set_input_files(f"#file-{name}", str(tmp_path / f"{name}.npy"))
    page.wait_for_function("() => document.getElementById('file-v-info').textContent !== ''")
    assert page.inner_text("#file-k-info") == ">f8 · shape (2, 6, 8)"
    assert "sent as float32" in page.inner_text("#file-v-info")
    page.fill("#labels", " ".join(labels))
    page.select_option("#causal", "bottom_right")
    page.fill("#window-left", "2")
    sent = viewer.submit("/v1/attention")
    assert sent["causal"] == "bottom_right" and sent["window"] == {"left": 2, "dilation": 1}
    assert sent["k"]["dtype"] == "float64" and sent["v"]["dtype"] == "float32"

    viewer.wait_for_heads(2)
    tile1 = viewer.tiles().nth(1).locator("canvas")
    for i, j in ((4, 5), (3, 2), (2, 3)):
        tip = viewer.hover(tile1, i, j, 5, 6)
        assert tip["query"].startswith(str(i))  # Lq != Lk: queries are numbered
        assert tip["key"].startswith(labels[j])
        assert _weight(tip["weight"]) == pytest.approx(ref[1, i, j], **SHOWN)
    assert _weight(viewer.hover(tile1, 0, 5, 5, 6)["weight"]) == 0.0  # after the diagonal
    viewer.wait_for_server_png()

    # Not a .npy file: said next to q, and nothing is sent.
    page.set_input_files(
        "#file-q",
        files=[{"name": "bad.npy", "mimeType": "application/octet-stream", "buffer": b"x"}],
    )
    page.locator("#file-q-error").wait_for()
    assert "not a .npy file" in page.inner_text("#file-q-error")
    sent_urls: list[str] = []
    page.on("request", lambda r: sent_urls.append(r.url) if "/v1/" in r.url else None)
    page.click("#submit")
    expect(page.locator("#file-q-error")).to_contain_text("bad.npy: not a .npy file")
    assert sent_urls == []
    assert viewer.errors == []


@needs_chromium
def test_api_key_stays_in_the_session_and_is_sent(
    viewer: Viewer, browser: Browser, server: Server
) -> None:
    page = viewer.page
    # The weights come from the server; the PNG request (the page's second) is answered here
    # with no images, after noting its Authorization header: images are not this test's subject.
    picture_auth: list[str | None] = []

    def no_pictures(route: Route) -> None:
        if (route.request.post_data_json or {}).get("heatmap") is False:
            route.continue_()
            return
        picture_auth.append(route.request.headers.get("authorization"))
        route.fulfill(status=200, content_type="application/json", body='{"heatmaps": []}')

    page.route("**/v1/tokens", no_pictures)
    viewer.open()
    page.fill("#api-key", "s3cret")
    page.fill("#num_heads", "2")
    page.fill("#d_model", "8")
    with page.expect_request(lambda r: r.url.endswith("/v1/tokens")) as request:
        page.click("#submit")
    assert request.value.headers.get("authorization") == "Bearer s3cret"
    viewer.wait_for_heads(2)
    expect(page.locator("#png-note")).to_have_text("The server drew no image of this view.")
    assert picture_auth == ["Bearer s3cret"]
    assert page.evaluate(f"() => sessionStorage.getItem('{KEY_STORAGE}')") == "s3cret"
    assert page.evaluate("() => localStorage.length") == 0
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#api-key") == "s3cret"

    other = browser.new_context()  # another session does not see it
    try:
        fresh = other.new_page()
        fresh.goto(server.url + "/")
        fresh.wait_for_selector("body[data-ready=true]")
        assert fresh.input_value("#api-key") == ""
    finally:
        other.close()

    page.fill("#api-key", "")
    with page.expect_request(lambda r: r.url.endswith("/v1/tokens")) as request:
        page.click("#submit")
    assert "authorization" not in request.value.headers
    assert page.evaluate(f"() => sessionStorage.getItem('{KEY_STORAGE}')") is None

    # A service that wants a key: the message is shown at the key field.
    problem = {"type": "about:blank", "title": "Unauthorized", "status": 401, "detail": "no key"}
    page.unroute("**/v1/tokens")
    page.route(
        "**/v1/tokens",
        lambda route: route.fulfill(
            status=401, content_type="application/problem+json", body=json.dumps(problem)
        ),
    )
    page.click("#submit")
    page.locator("#api-key-error").wait_for()
    assert "needs an API key" in page.inner_text("#api-key-error")
