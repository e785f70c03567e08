"""The viewer's real-model mode (/model), end to end in headless Chromium against the real
server: the head view the page draws is the weights the API answers (checked against
`transformers` too), the pickers, hover, the server's model view and the PNG/SVG downloads.

Fixtures: the server as `make run` starts it (conftest.py), Debian's chromium and the page
(test_viewer.py's).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.http import app_client
from tests.support.minilm import reference_text
from tests.web.test_viewer import Viewer, browser, viewer  # noqa: F401 - fixtures

SENTENCE = "The cat sat on the mat because it was warm."
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]


def weights_of(body: dict[str, Any]) -> np.ndarray:
    w = body["weights"]
    raw = base64.b64decode(w["b64"])
    return np.frombuffer(raw, dtype="<f4").reshape(w["shape"])


def drawn_lines(v: Viewer) -> list[dict[str, Any]]:
    return v.page.eval_on_selector_all(
        "#head-view line",
        "ls => ls.map(l => ({q: +l.dataset.q, k: +l.dataset.k, head: +l.dataset.head,"
        " stroke: l.getAttribute('stroke'), opacity: +l.getAttribute('stroke-opacity'),"
        " on: l.classList.contains('on')}))",
    )


def run_model(v: Viewer) -> dict[str, Any]:
    """Press the button; the JSON the page received."""
    with v.page.expect_response(lambda r: r.url.endswith("/v1/tokens")) as response:
        v.page.click("#submit")
    v.page.wait_for_selector("#head-view line", state="attached")
    return response.value.json()


@pytest.fixture
def model_page(viewer: Viewer) -> Viewer:  # noqa: F811
    outside: list[str] = []

    def only_local(route: Any) -> None:
        if re.match(r"https?://127\.0\.0\.1:\d+/", route.request.url):
            route.continue_()
        else:  # the page works offline: nothing may come from elsewhere
            outside.append(route.request.url)
            route.abort()

    viewer.page.route("**/*", only_local)
    viewer.page.goto(viewer.url + "/model")
    viewer.page.wait_for_selector("body[data-ready=true]")
    yield viewer
    assert outside == [] and viewer.errors == []


def test_the_model_page_and_its_files_are_served_from_the_service(tmp_path: Path) -> None:
    with app_client(tmp_path) as c:
        page = c.get("/model")
        assert (
            page.status_code == 200
            and "script-src 'self'" in page.headers["content-security-policy"]
        )
        refs = set(re.findall(r'(?:src|href)="([^"]+)"', page.text))
        assert {"/static/model.js", "/static/model.css", "/static/viewer.css", "/"} <= refs
        for ref in refs:
            assert ref.startswith("/") and c.get(ref).status_code == 200, ref
            if ref.endswith((".js", ".css")):
                # Addresses other than the SVG namespace's name would be fetches from elsewhere.
                text = c.get(ref).text.replace('"http://www.w3.org/2000/svg"', "")
                assert "http://" not in text and "https://" not in text, ref
        assert 'href="/model"' in c.get("/").text  # the main viewer links to this mode


def test_head_view_draws_the_weights_of_the_real_model(model_page: Viewer) -> None:
    v = model_page
    body = run_model(v)
    weights = weights_of(body)
    n = len(body["tokens"])
    assert weights.shape == (6, 12, n, n)
    # The API's numbers are BertModel's (tests/core/test_minilm.py checks every layer).
    np.testing.assert_allclose(weights[0], reference_text(SENTENCE)[0][0], atol=1e-4)
    lines = drawn_lines(v)
    expected = {(h, i, j) for h, i, j in zip(*np.nonzero(weights[0] >= 0.01), strict=True)}
    assert {(ln["head"], ln["q"], ln["k"]) for ln in lines} == expected
    for ln in lines[:: max(1, len(lines) // 50)]:
        assert ln["opacity"] == pytest.approx(
            float(weights[0, ln["head"], ln["q"], ln["k"]]), abs=1e-6
        )
    summary = v.page.inner_text("#summary")
    assert f"{n}" in summary and "6 × 12" in summary
    v.page.wait_for_function(
        "() => { const i = document.getElementById('model-view');"
        " return i.complete && i.naturalWidth > 1000; }"
    )


def test_layer_and_head_pickers_and_hover(model_page: Viewer) -> None:
    v = model_page
    body = run_model(v)
    weights = weights_of(body)
    v.page.select_option("#layer", "3")
    v.page.click("#heads-none")
    assert drawn_lines(v) == []
    v.page.check("#head-picker input[data-head='5']")
    v.page.check("#head-picker input[data-head='2']")
    lines = drawn_lines(v)
    assert {ln["stroke"] for ln in lines} == {COLOURS[2], COLOURS[5]}
    for head in (2, 5):
        mine = [ln for ln in lines if ln["head"] == head]
        assert len(mine) == int((weights[3, head] >= 0.01).sum())
    # Hover the query "cat": only its lines stay, the tooltip names its heaviest key per head.
    cat = body["tokens"].index("cat")
    v.page.hover(f"#head-view text[data-side=query][data-index='{cat}']")
    on = [ln for ln in drawn_lines(v) if ln["on"]]
    assert on and all(ln["q"] == cat for ln in on)
    tip = v.page.inner_text("#tooltip")
    for head in (2, 5):
        j = int(weights[3, head, cat].argmax())
        assert f"head {head}: → {body['tokens'][j]} {weights[3, head, cat, j]:.4f}" in tip


def test_downloads_are_the_servers_png_and_svg(model_page: Viewer) -> None:
    v = model_page
    run_model(v)
    v.page.select_option("#layer", "4")
    with v.page.expect_download() as d:
        v.page.click("#head-svg")
    svg = Path(d.value.path()).read_text()
    assert d.value.suggested_filename == "minilm-l6-layer4-head-view.svg"
    assert svg.lstrip().startswith("<?xml") and "minilm-l6, layer 4" in svg
    with v.page.expect_download() as d:
        v.page.click("#model-png")
    assert Path(d.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_long_a_text_is_shown_at_its_field_until_truncation_is_asked(
    model_page: Viewer,
) -> None:
    v = model_page
    v.page.fill("#text", "one two three four five six seven eight nine ten " * 60)
    v.page.click("#submit")
    v.page.wait_for_selector("#text-error:not(:empty)")
    assert "602 wordpieces" in v.page.inner_text("#text-error")
    # The browser logs the 422 as a failed resource: expected here.
    v.errors[:] = [e for e in v.errors if "status of 422" not in e]
    v.page.check("#truncate")
    v.page.click("#submit")
    v.page.wait_for_function(
        "() => document.getElementById('summary').innerText.includes('512 of 602')",
        timeout=120_000,
    )
    assert "read the first 512" in v.page.inner_text("#notes")
    assert v.page.inner_text("#text-error") == ""
