"""POST /v1/tokens, against independent float64 torch references (tests/core/test_tokens.py
checks the pipeline's parts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import service
from service.core import tokens as pipeline
from service.core.options import MaskingOptions
from tests.support.http import app_client, assert_problem, decode, post
from tests.support.reference import mha_reference, sinusoidal_reference

TEXT = "the cat sat on the mat because the mat was warm"


# Settings of this module's `client` fixture (tests/conftest.py).
APP_SETTINGS = {"max_elements": 300_000}


# ---------------------------------------------------------------------------------------------
# The endpoint


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "none", "rope"])
@pytest.mark.parametrize("causal", [False, True])
def test_pipeline_matches_a_float64_reference(client, positional: str, causal: bool) -> None:
    toks = TEXT.split()
    body = {
        "tokens": toks,
        "d_model": 16,
        "num_heads": 4,
        "positional": positional,
        "seed": 2,
        "causal": causal,
        "heatmap": False,
        "encoding": "b64",
    }
    r = post(client, "/v1/tokens", body)
    assert r.status_code == 200, r.text
    res = r.json()
    x = torch.from_numpy(pipeline.embed(toks, 16, 2).astype(np.float64))
    if positional == "sinusoidal":
        x = x + sinusoidal_reference(len(toks), 16)
    elif positional == "learned":
        x = x + torch.from_numpy(pipeline.learned(len(toks), 16, 2).astype(np.float64))
    w = service.init_multihead_weights(16, 4, seed=2)
    out, probs = mha_reference(x, w, 4, rope=positional == "rope", causal=causal)
    np.testing.assert_allclose(decode(res["output"]), out.numpy(), atol=1e-4)
    np.testing.assert_allclose(decode(res["weights"]), probs.numpy(), atol=1e-5)
    assert res["tokens"] == toks
    assert res["meta"]["param_count"] == 4 * 16 * 16 + 4 * 16
    assert res["meta"]["positional"] == positional and res["meta"]["shape"] == [len(toks), 16]


def test_equals_the_python_api_exactly(client) -> None:
    toks = TEXT.split()
    r = post(
        client,
        "/v1/tokens",
        {
            "tokens": toks,
            "d_model": 32,
            "num_heads": 4,
            "seed": 1,
            "heatmap": False,
            "encoding": "b64",
        },
    )
    x = pipeline.embed(toks, 32, 1) + pipeline.sinusoidal(len(toks), 32)
    api = service.multihead_attention(
        x, num_heads=4, seed=1, need_weights=True, average_weights=False
    )
    np.testing.assert_array_equal(decode(r.json()["output"]), api.output)
    np.testing.assert_array_equal(decode(r.json()["weights"]), api.weights)


def test_text_is_split_on_whitespace(client) -> None:
    a = post(client, "/v1/tokens", {"text": "  a b\tc\n d ", "heatmap": False}).json()
    b = post(client, "/v1/tokens", {"tokens": ["a", "b", "c", "d"], "heatmap": False}).json()
    assert a["tokens"] == ["a", "b", "c", "d"]
    assert a["output"] == b["output"]
    assert len(a["output"][0]) == 64 and len(a["weights"]) == 8  # defaults: d_model 64, 8 heads


def test_heatmaps_and_positional_picture(client) -> None:
    r = post(client, "/v1/tokens", {"text": TEXT, "d_model": 16, "num_heads": 2})
    res = r.json()
    assert [h["head"] for h in res["heatmaps"]] == [0, 1, "mean", "all"]
    for ref in [*res["heatmaps"], res["positional_encoding"]]:
        image = client.get(ref["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    none = post(
        client,
        "/v1/tokens",
        {
            "text": TEXT,
            "d_model": 16,
            "positional": "none",
            "heatmap": {"heads": "mean", "inline": True},
        },
    ).json()
    assert none["positional_encoding"] is None
    assert [h["head"] for h in none["heatmaps"]] == ["mean"] and "png" in none["heatmaps"][0]
    averaged = post(client, "/v1/tokens", {"text": TEXT, "average_weights": True, "heatmap": False})
    assert np.asarray(averaged.json()["weights"]).shape == (len(TEXT.split()),) * 2


@pytest.mark.parametrize(
    ("body", "loc", "status"),
    [
        ({"text": "a b", "tokens": ["a"]}, ["tokens"], 422),
        ({}, ["tokens"], 422),
        ({"text": "   "}, ["text"], 422),
        ({"tokens": []}, ["tokens"], 422),
        ({"tokens": ["a", 3]}, ["tokens", 1], 422),
        ({"text": "a b", "d_model": 10, "num_heads": 4}, ["num_heads"], 422),
        ({"text": "a b", "d_model": 0}, ["d_model"], 422),
        ({"text": "a b", "d_model": 12, "num_heads": 4, "positional": "rope"}, ["positional"], 422),
        ({"text": "a b", "positional": "alibi"}, ["positional"], 422),
        ({"text": "a b", "seed": -2}, ["seed"], 422),
        ({"text": "a b", "d_model": 100_000}, ["d_model"], 413),
        ({"text": "a " * 300, "heatmap": False}, ["tokens"], 413),
        ({"text": "a b", "heatmap": {"tokens": ["x"]}}, ["heatmap", "tokens"], 422),
        ({"text": "a b", "window": {"left": "x"}}, ["window", "left"], 422),
    ],
)
def test_invalid_input_names_the_field(client, body: dict, loc: list, status: int) -> None:
    assert_problem(post(client, "/v1/tokens", body), status, loc)


def test_too_many_tokens_for_a_heatmap(tmp_path: Path) -> None:
    with app_client(tmp_path, heatmap_max_side=8) as small:
        r = post(small, "/v1/tokens", {"text": TEXT})
        body = assert_problem(r, 422, ["heatmap"])
        assert "ATTN_HEATMAP_MAX_SIDE" in body["detail"]
        assert post(small, "/v1/tokens", {"text": TEXT, "heatmap": False}).status_code == 200


def test_masking_options_apply(client) -> None:
    toks = TEXT.split()
    r = post(
        client,
        "/v1/tokens",
        {"tokens": toks, "window": {"left": 1, "right": 0}, "heatmap": False, "encoding": "b64"},
    )
    w = decode(r.json()["weights"])
    allowed = np.tril(np.ones((len(toks),) * 2, bool)) & ~np.tril(np.ones_like(w[0], bool), -2)
    assert (w[:, ~allowed] == 0).all() and np.allclose(w.sum(-1), 1, atol=1e-5)
    masking = MaskingOptions(window={"left": 1, "right": 0})
    direct = pipeline.self_attention(
        toks,
        d_model=64,
        num_heads=8,
        num_kv_heads=None,
        positional="sinusoidal",
        seed=0,
        weights=None,
        masking=masking,
    )
    np.testing.assert_array_equal(w, direct.weights)


def test_any_token_text_is_drawn_or_refused_by_name(client) -> None:
    # TeX-like, control, long, emoji and bidi tokens are labels, never formulas or crashes.
    odd = ["$x$", "$\\frac", "\u0000", "a" * 10_000, "\U0001f600", "\n", "\u202e", "%s", "$$"]
    r = post(
        client,
        "/v1/tokens",
        {"tokens": odd, "d_model": 8, "num_heads": 2, "heatmap": {"heads": [0], "inline": True}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == odd
    lone = b'{"tokens": ["a", "\\ud800"], "d_model": 8, "num_heads": 2}'
    r = client.post("/v1/tokens", content=lone, headers={"content-type": "application/json"})
    assert_problem(r, 422, ["tokens", 1])
    r = client.post(
        "/v1/attention",
        content=b'{"\\ud800": 1, "q": [[1.0]], "k": [[1.0]], "v": [[1.0]]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
