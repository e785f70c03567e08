"""POST /v1/tokens and the tokens pipeline, against independent float64 torch references."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from http_support import assert_problem, client, decode, post

import service
from service import tokens as pipeline
from service.options import MaskingOptions

TEXT = "the cat sat on the mat because the mat was warm"


@pytest.fixture(scope="module")
def c(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with client(tmp_path_factory.mktemp("tokens"), max_elements=300_000) as test_client:
        yield test_client


def sinusoidal_reference(length: int, d: int) -> torch.Tensor:
    """Vaswani et al. 2017, written from the paper's formula."""
    pe = torch.zeros(length, d, dtype=torch.float64)
    for pos in range(length):
        for i in range(0, d, 2):
            angle = pos / (10000 ** (i / d))
            pe[pos, i] = math.sin(angle)
            if i + 1 < d:
                pe[pos, i + 1] = math.cos(angle)
    return pe


def rope_reference(x: torch.Tensor) -> torch.Tensor:
    """Rotate (L, hd) by position: pairs (i, i + hd/2) as complex numbers times e^{i p theta_i}."""
    length, hd = x.shape
    half = hd // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * theta
    z = torch.complex(x[:, :half], x[:, half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=1)


def mha_reference(
    x: torch.Tensor, w: service.MultiheadWeights, num_heads: int, *, rope: bool, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention written out in float64: (L, E) -> output, per-head weights."""
    length, e = x.shape
    hd = e // num_heads
    t = {n: torch.from_numpy(np.asarray(getattr(w, n), np.float64)) for n in type(w).model_fields}
    q, k, v = (x @ t[f"{p}_proj"].T + t[f"{p}_bias"] for p in "qkv")
    outs, probs = [], []
    for h in range(num_heads):
        qh, kh, vh = (m[:, h * hd : (h + 1) * hd] for m in (q, k, v))
        if rope:
            qh, kh = rope_reference(qh), rope_reference(kh)
        s = qh @ kh.T / math.sqrt(hd)
        if causal:
            s = s.masked_fill(torch.triu(torch.ones_like(s, dtype=torch.bool), 1), -math.inf)
        p = torch.softmax(s, dim=-1)
        probs.append(p)
        outs.append(p @ vh)
    out = torch.cat(outs, dim=1) @ t["out_proj"].T + t["out_bias"]
    return out, torch.stack(probs)


# ---------------------------------------------------------------------------------------------
# The pipeline's parts


def test_embeddings_are_deterministic_per_token_and_seed() -> None:
    toks = TEXT.split()
    e = pipeline.embed(toks, 16, seed=3)
    assert e.shape == (len(toks), 16) and e.dtype == np.float32
    np.testing.assert_array_equal(e[0], e[4])  # "the" twice
    np.testing.assert_array_equal(e[0], pipeline.embed(["the"], 16, seed=3)[0])
    assert not np.array_equal(e[0], e[1])
    assert not np.array_equal(e[0], pipeline.embed(["the"], 16, seed=4)[0])


def test_embeddings_do_not_depend_on_the_process_hash_seed() -> None:
    code = "from service.tokens import embed; print(embed(['héllo', 'x'], 8, 5).tobytes().hex())"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2)
    }
    assert runs == {pipeline.embed(["héllo", "x"], 8, 5).tobytes().hex() + "\n"}


@pytest.mark.parametrize("d", [8, 9, 64])
def test_sinusoidal_matches_the_formula(d: int) -> None:
    np.testing.assert_allclose(
        pipeline.sinusoidal(20, d), sinusoidal_reference(20, d).numpy(), atol=1e-6
    )


def test_learned_positions_are_seeded_and_independent_of_length() -> None:
    long = pipeline.learned(30, 8, seed=1)
    np.testing.assert_array_equal(pipeline.learned(10, 8, seed=1), long[:10])
    assert not np.array_equal(pipeline.learned(10, 8, seed=2), long[:10])


def test_rope_matches_complex_rotation() -> None:
    x = np.random.default_rng(0).standard_normal((2, 7, 8)).astype(np.float32)
    cos, sin = pipeline.rope_tables(7, 8)
    got = pipeline.apply_rope(x, cos, sin)
    for h in range(2):
        ref = rope_reference(torch.from_numpy(x[h].astype(np.float64)))
        np.testing.assert_allclose(got[h], ref.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The endpoint


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "none", "rope"])
@pytest.mark.parametrize("causal", [False, True])
def test_pipeline_matches_a_float64_reference(c, positional: str, causal: bool) -> None:
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
    r = post(c, "/v1/tokens", body)
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


def test_equals_the_python_api_exactly(c) -> None:
    toks = TEXT.split()
    r = post(
        c,
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


def test_text_is_split_on_whitespace(c) -> None:
    a = post(c, "/v1/tokens", {"text": "  a b\tc\n d ", "heatmap": False}).json()
    b = post(c, "/v1/tokens", {"tokens": ["a", "b", "c", "d"], "heatmap": False}).json()
    assert a["tokens"] == ["a", "b", "c", "d"]
    assert a["output"] == b["output"]
    assert len(a["output"][0]) == 64 and len(a["weights"]) == 8  # defaults: d_model 64, 8 heads


def test_heatmaps_and_positional_picture(c) -> None:
    r = post(c, "/v1/tokens", {"text": TEXT, "d_model": 16, "num_heads": 2})
    res = r.json()
    assert [h["head"] for h in res["heatmaps"]] == [0, 1, "mean", "all"]
    for ref in [*res["heatmaps"], res["positional_encoding"]]:
        image = c.get(ref["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    none = post(
        c,
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
    averaged = post(c, "/v1/tokens", {"text": TEXT, "average_weights": True, "heatmap": False})
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
def test_invalid_input_names_the_field(c, body: dict, loc: list, status: int) -> None:
    assert_problem(post(c, "/v1/tokens", body), status, loc)


def test_too_many_tokens_for_a_heatmap(tmp_path: Path) -> None:
    with client(tmp_path, heatmap_max_side=8) as small:
        r = post(small, "/v1/tokens", {"text": TEXT})
        body = assert_problem(r, 422, ["heatmap"])
        assert "ATTN_HEATMAP_MAX_SIDE" in body["detail"]
        assert post(small, "/v1/tokens", {"text": TEXT, "heatmap": False}).status_code == 200


def test_masking_options_apply(c) -> None:
    toks = TEXT.split()
    r = post(
        c,
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


def test_any_token_text_is_drawn_or_refused_by_name(c) -> None:
    # TeX-like, control, long, emoji and bidi tokens are labels, never formulas or crashes.
    odd = ["$x$", "$\\frac", "\u0000", "a" * 10_000, "\U0001f600", "\n", "\u202e", "%s", "$$"]
    r = post(
        c,
        "/v1/tokens",
        {"tokens": odd, "d_model": 8, "num_heads": 2, "heatmap": {"heads": [0], "inline": True}},
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == odd
    lone = b'{"tokens": ["a", "\\ud800"], "d_model": 8, "num_heads": 2}'
    r = c.post("/v1/tokens", content=lone, headers={"content-type": "application/json"})
    assert_problem(r, 422, ["tokens", 1])
    r = c.post(
        "/v1/attention",
        content=b'{"\\ud800": 1, "q": [[1.0]], "k": [[1.0]], "v": [[1.0]]}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
