"""/v1/attention's exact maps in O(L) memory (service.core.maps): heatmaps longer than
ATTN_HEATMAP_MAX_SIDE drawn pooled, and "stats", against the float64 torch reference."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from service.render.canvas import render_map
from tests.support.http import b64, post
from tests.support.reference import bin_means, random_qkv, reference_attention, row_entropy

# Settings of this module's `client` fixture (tests/conftest.py).
APP_SETTINGS = {"heatmap_max_side": 16}


def test_heatmap_over_the_limit_is_pooled(client) -> None:
    q, k, v = random_qkv(1, 2, 1, 40, 40, 8, 11, seed=11)
    body = {"q": b64(q), "k": b64(k), "v": b64(v), "causal": True}
    r = post(client, "/v1/attention", {**body, "heatmap": {"heads": [1], "inline": True}})
    assert r.status_code == 200, r.text
    images = r.json()["heatmaps"]
    assert [im["head"] for im in images] == [1]
    # The image is the pooled map (16 x 16 bin means) titled as pooled: render the reference
    # pooling with the same title and compare the pictures pixel for pixel.
    w = reference_attention(q, k, v, causal=True).weights.numpy()
    expected = render_map(
        bin_means(w, 16, 16)[0, 1].astype(np.float32),
        title="attention pooled 40×40→16×16 (bin means), batch 0, head 1",
    )
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(images[0]["png"]))))
    want = np.asarray(Image.open(io.BytesIO(expected)))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 2
    # Within the limit nothing changes: the dense map is drawn, no pooling.
    small = {"q": b64(q[:, :, :16]), "k": b64(k[:, :, :16]), "v": b64(v[:, :, :16])}
    r = post(client, "/v1/attention", {**small, "heatmap": {"inline": True, "heads": [0]}})
    assert r.status_code == 200, r.text


def test_stats(client) -> None:
    q, k, v = random_qkv(1, 2, 2, 30, 30, 8, 11, seed=12)
    body = {
        "q": q[0].tolist(),
        "k": k[0].tolist(),
        "v": v[0].tolist(),
        "stats": True,
        "top_k": 3,
        "window": {"left": 4, "right": 0},
        "key_lengths": [25],
    }
    r = post(client, "/v1/attention", body)
    assert r.status_code == 200, r.text
    stats = r.json()["stats"]
    ref = reference_attention(q, k, v, window={"left": 4, "right": 0}, key_lengths=[25])
    w = ref.weights.numpy()[0]
    np.testing.assert_allclose(stats["entropy"], row_entropy(w), atol=1e-4)
    np.testing.assert_allclose(stats["column_sums"], w.sum(-2), atol=1e-4)
    np.testing.assert_allclose(stats["top_k"]["weights"], -np.sort(-w, -1)[..., :3], atol=1e-5)
    idx = np.array(stats["top_k"]["indices"])
    assert idx.shape == (2, 30, 3)
    np.testing.assert_allclose(np.take_along_axis(w, idx, -1), stats["top_k"]["weights"], atol=1e-5)
    np.testing.assert_allclose(r.json()["output"], ref.output.numpy()[0], atol=1e-5)
    assert post(client, "/v1/attention", {**body, "method": "linear"}).status_code == 422
