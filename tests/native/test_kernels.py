"""service._native against an independent float64 torch reference.

The reference builds the full score matrix and an explicit dense "allowed" mask straight from
the contract's rules (docs in notes/native_contract.md) and applies a plain softmax; the kernel
never materialises either, so agreement exercises its tiling, tile skipping and online softmax.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from service import _native
from tests.support.native import ISAS, REQUIRES

ATOL = 1e-4


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    causal: int = 0,
    mask: np.ndarray | None = None,
    key_lengths: np.ndarray | None = None,
    window_left: int = -1,
    window_right: int = -1,
    dilation: int = 1,
    global_tokens: np.ndarray | None = None,
    alibi_slopes: np.ndarray | None = None,
    softcap: float = 0.0,
    **_: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, weights) in float64; rows with no allowed key give 0, -inf, 0."""
    qt, kt, vt = (torch.from_numpy(np.asarray(x)).double() for x in (q, k, v))
    b, hq, lq, _d = qt.shape
    hkv, lk = kt.shape[1], kt.shape[2]
    kt = kt.repeat_interleave(hq // hkv, dim=1)
    vt = vt.repeat_interleave(hq // hkv, dim=1)
    s = scale * qt @ kt.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    c = i + lk - lq
    if alibi_slopes is not None:
        slopes = torch.from_numpy(np.asarray(alibi_slopes)).double()
        s = s - slopes[None, :, None, None] * (c - j).abs()
    allowed = torch.ones(b, hq, lq, lk, dtype=torch.bool)
    if mask is not None:
        m = torch.from_numpy(np.ascontiguousarray(mask))
        if m.dtype == torch.bool:
            allowed &= m
        else:
            s = s + m.double()
    if causal == 1:
        allowed &= j <= i
    elif causal == 2:
        allowed &= j <= c
    if key_lengths is not None:
        allowed &= j < torch.from_numpy(np.asarray(key_lengths))[:, None, None, None]
    if window_left >= 0 or window_right >= 0 or dilation > 1:
        delta = j - c
        win = torch.remainder(delta, dilation) == 0
        if window_left >= 0:
            win &= delta >= -window_left * dilation
        if window_right >= 0:
            win &= delta <= window_right * dilation
        if global_tokens is not None and len(global_tokens):
            g = torch.zeros(lk, dtype=torch.bool)
            g[torch.from_numpy(np.asarray(global_tokens))] = True
            row_global = (c >= 0) & (c < lk) & g[c.clamp(0, max(lk - 1, 0))]
            win = win | g[None, :] | row_global
        allowed &= win
    s = s.masked_fill(~allowed, float("-inf"))
    mx = s.amax(-1, keepdim=True) if lk else torch.full((b, hq, lq, 1), float("-inf"))
    mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
    e = torch.exp(s - mx)
    total = e.sum(-1, keepdim=True)
    w = torch.where(total > 0, e / total, torch.zeros_like(e))
    lse = torch.where(total > 0, torch.log(total) + mx, torch.full_like(mx, float("-inf")))
    return w @ vt, lse.squeeze(-1), w


def check(q: np.ndarray, k: np.ndarray, v: np.ndarray, **kw: object) -> None:
    """Runs the kernel with and without weights and compares everything to the reference."""
    out, lse, w = _native.attention(q, k, v, return_weights=True, **kw)
    ref_out, ref_lse, ref_w = reference(q, k, v, **kw)
    assert out.dtype == np.float32 and out.shape == tuple(ref_out.shape)
    assert not np.isnan(out).any() and not np.isnan(lse).any() and not np.isnan(w).any()
    np.testing.assert_allclose(out, ref_out.numpy(), rtol=0, atol=ATOL)
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=0, atol=1e-5)
    finite = np.isfinite(ref_lse.numpy())
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    np.testing.assert_allclose(lse[finite], ref_lse.numpy()[finite], rtol=0, atol=ATOL)
    np.testing.assert_allclose(w.sum(-1)[finite], 1.0, atol=1e-5)
    assert (w.sum(-1)[~finite] == 0).all() and (out[~finite] == 0).all()
    out2, lse2, none = _native.attention(q, k, v, **kw)
    assert none is None
    np.testing.assert_array_equal(out2, out)
    np.testing.assert_array_equal(lse2, lse)


# ---------------------------------------------------------------------------------------------
# attention(): every option, on every ISA this CPU has


@pytest.mark.parametrize(
    ("lq", "lk", "d", "dv"),
    [(1, 1, 16, 16), (37, 53, 64, 64), (200, 130, 80, 48), (96, 96, 128, 128), (5, 300, 64, 7)],
)
def test_shapes(isa: str, lq: int, lk: int, d: int, dv: int) -> None:
    rng = np.random.default_rng(lq * 1000 + lk)
    q, k, v = rand(rng, 2, 3, lq, d), rand(rng, 2, 3, lk, d), rand(rng, 2, 3, lk, dv)
    check(q, k, v, scale=d**-0.5)


@pytest.mark.parametrize("causal", [1, 2])
@pytest.mark.parametrize(("lq", "lk"), [(50, 130), (130, 50), (97, 97)])
def test_causal_alignments(isa: str, causal: int, lq: int, lk: int) -> None:
    rng = np.random.default_rng(causal + lq)
    q, k, v = rand(rng, 1, 2, lq, 32), rand(rng, 1, 2, lk, 32), rand(rng, 1, 2, lk, 32)
    check(q, k, v, scale=0.2, causal=causal)


@pytest.mark.parametrize(
    "kw",
    [
        {"causal": 1},
        {"causal": 2, "window_left": 100, "window_right": 0},
        {"window_left": 150, "window_right": 40, "key_lengths": np.array([601, 333])},
        {"causal": 1, "window_left": 64, "global_tokens": np.array([3, 300, 599])},
    ],
)
def test_many_tiles_with_skipping(isa: str, kw: dict) -> None:
    """Several query and key tiles, some skipped entirely, some cut at a boundary."""
    rng = np.random.default_rng(17)
    q, k, v = rand(rng, 2, 2, 610, 64), rand(rng, 2, 2, 640, 64), rand(rng, 2, 2, 640, 64)
    check(q, k, v, scale=0.125, **kw)


def test_bool_and_float_masks_broadcast_and_strided(isa: str) -> None:
    rng = np.random.default_rng(1)
    b, h, lq, lk = 2, 4, 70, 110
    q, k, v = rand(rng, b, h, lq, 64), rand(rng, b, h, lk, 64), rand(rng, b, h, lk, 64)
    # Broadcast bool masks: zero strides over batch/head/query.
    per_key = rng.random((b, 1, 1, lk)) < 0.7
    check(q, k, v, scale=0.125, mask=np.broadcast_to(per_key, (b, h, lq, lk)))
    per_query_key = rng.random((1, 1, lq, lk)) < 0.5
    check(q, k, v, scale=0.125, mask=np.broadcast_to(per_query_key, (b, h, lq, lk)))
    # Non-contiguous float mask with -inf entries (every other column of a wider array).
    wide = rng.standard_normal((b, h, lq, 2 * lk)).astype(np.float32)
    wide[rng.random(wide.shape) < 0.2] = -np.inf
    check(q, k, v, scale=0.125, mask=wide[..., ::2])
    # Transposed (Lq/Lk-swapped) view.
    t = (rng.random((b, h, lk, lq)) < 0.6).transpose(0, 1, 3, 2)
    check(q, k, v, scale=0.125, mask=t, causal=2)


def test_key_lengths(isa: str) -> None:
    rng = np.random.default_rng(2)
    q, k, v = rand(rng, 4, 2, 40, 16), rand(rng, 4, 2, 150, 16), rand(rng, 4, 2, 150, 16)
    check(q, k, v, scale=0.3, key_lengths=np.array([150, 0, 1, 77], dtype=np.int64))
    check(q, k, v, scale=0.3, causal=2, key_lengths=np.array([3, 150, 64, 65], dtype=np.int64))


@pytest.mark.parametrize(
    ("left", "right", "dilation"),
    [(8, 8, 1), (0, 0, 1), (20, -1, 1), (-1, 5, 1), (6, 3, 3), (-1, -1, 4), (70, 70, 1)],
)
def test_window(isa: str, left: int, right: int, dilation: int) -> None:
    rng = np.random.default_rng(abs(left * 7 + right + dilation))
    q, k, v = rand(rng, 1, 2, 230, 32), rand(rng, 1, 2, 300, 32), rand(rng, 1, 2, 300, 32)
    check(q, k, v, scale=0.2, window_left=left, window_right=right, dilation=dilation)


@pytest.mark.parametrize("causal", [0, 1, 2])
def test_global_tokens(isa: str, causal: int) -> None:
    rng = np.random.default_rng(3 + causal)
    lq, lk = 260, 400
    q, k, v = rand(rng, 2, 2, lq, 32), rand(rng, 2, 2, lk, 32), rand(rng, 2, 2, lk, 32)
    # Globals in far-away tiles, one aligned with query rows (c = i + 140), one at the end.
    g = np.array([0, 5, 150, 251, 399], dtype=np.int64)
    check(q, k, v, scale=0.2, window_left=10, window_right=4, global_tokens=g, causal=causal)
    check(q, k, v, scale=0.2, window_left=3, window_right=3, dilation=2, global_tokens=g)


def test_alibi_and_softcap(isa: str) -> None:
    rng = np.random.default_rng(4)
    q, k, v = rand(rng, 1, 4, 90, 64), rand(rng, 1, 4, 120, 64), rand(rng, 1, 4, 120, 64)
    slopes = np.array([2.0 ** (-8 * (h + 1) / 4) for h in range(4)], dtype=np.float32)
    check(q, k, v, scale=0.125, alibi_slopes=slopes)
    check(q, k, v, scale=1.0, softcap=5.0)
    check(q, k, v, scale=0.125, softcap=0.5, alibi_slopes=slopes, causal=2)


def test_all_options_combined_with_gqa(isa: str) -> None:
    rng = np.random.default_rng(5)
    b, hq, hkv, lq, lk = 2, 6, 2, 150, 210
    q, k, v = rand(rng, b, hq, lq, 80), rand(rng, b, hkv, lk, 80), rand(rng, b, hkv, lk, 40)
    fmask = np.broadcast_to(rng.standard_normal((1, hq, 1, lk)).astype(np.float32), (b, hq, lq, lk))
    check(
        q,
        k,
        v,
        scale=0.11,
        causal=2,
        mask=fmask,
        key_lengths=np.array([200, 130], dtype=np.int64),
        window_left=30,
        window_right=10,
        dilation=2,
        global_tokens=np.array([1, 64, 190], dtype=np.int64),
        alibi_slopes=np.linspace(0.01, 0.2, hq).astype(np.float32),
        softcap=20.0,
    )
    bmask = rng.random((b, 1, lq, lk)) < 0.8
    check(q, k, v, scale=0.11, mask=np.broadcast_to(bmask, (b, hq, lq, lk)), window_left=40)


def test_gqa_matches_torch_sdpa() -> None:
    rng = np.random.default_rng(6)
    q, k, v = rand(rng, 2, 8, 64, 32), rand(rng, 2, 2, 64, 32), rand(rng, 2, 2, 64, 32)
    out, _, _ = _native.attention(q, k, v, scale=32**-0.5, causal=1)
    t = torch.nn.functional.scaled_dot_product_attention(
        *(torch.from_numpy(x).double() for x in (q, k, v)), is_causal=True, enable_gqa=True
    )
    np.testing.assert_allclose(out, t.numpy(), atol=ATOL)


def test_fully_masked_rows_are_zero_not_nan(isa: str) -> None:
    rng = np.random.default_rng(7)
    q, k, v = rand(rng, 1, 2, 20, 16), rand(rng, 1, 2, 30, 16), rand(rng, 1, 2, 30, 16)
    mask = np.ones((1, 2, 20, 30), dtype=bool)
    mask[:, :, 3] = False  # one row with nothing allowed
    fmask = np.zeros((1, 2, 20, 30), dtype=np.float32)
    fmask[:, :, 5] = -np.inf  # one row whose scores are all -inf
    check(q, k, v, scale=0.25, mask=mask)
    check(q, k, v, scale=0.25, mask=fmask)
    # Top-left causal with Lq > Lk: bottom-right rows see nothing.
    check(q, k[:, :, :10], v[:, :, :10], scale=0.25, causal=2)
    out, lse, w = _native.attention(q, k, v, scale=0.25, mask=mask, return_weights=True)
    assert (out[:, :, 3] == 0).all() and (w[:, :, 3] == 0).all() and np.isneginf(lse[:, :, 3]).all()


def test_empty_and_degenerate_shapes() -> None:
    rng = np.random.default_rng(8)
    q, k, v = rand(rng, 1, 2, 0, 16), rand(rng, 1, 2, 5, 16), rand(rng, 1, 2, 5, 16)
    out, lse, w = _native.attention(q, k, v, scale=1.0, return_weights=True)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0) and w.shape == (1, 2, 0, 5)
    q = rand(rng, 1, 2, 4, 16)
    out, lse, w = _native.attention(q, k[:, :, :0], v[:, :, :0], scale=1.0, return_weights=True)
    assert (out == 0).all() and np.isneginf(lse).all() and w.shape == (1, 2, 4, 0)
    out, _, _ = _native.attention(q[:0], k[:0], v[:0], scale=1.0)
    assert out.shape == (0, 2, 4, 16)


def test_strided_qkv_views_are_read_in_place() -> None:
    rng = np.random.default_rng(9)
    qkv = rand(rng, 2, 50, 3, 4, 32)  # (B, L, 3, H, D) as a fused projection would give
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    assert not q.flags.c_contiguous
    check(q, k, v, scale=0.2, causal=1)


# ---------------------------------------------------------------------------------------------
# multihead(): torch.nn.MultiheadAttention math


def _mha_weights(mha: torch.nn.MultiheadAttention) -> dict[str, np.ndarray | None]:
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.detach().numpy().reshape(3, e, e)
    else:
        wq = mha.q_proj_weight.detach().numpy()
        wk = mha.k_proj_weight.detach().numpy()
        wv = mha.v_proj_weight.detach().numpy()
    bq, bk, bv = mha.in_proj_bias.detach().numpy().reshape(3, e)
    return dict(
        q_weight=wq,
        k_weight=wk,
        v_weight=wv,
        out_weight=mha.out_proj.weight.detach().numpy(),
        q_bias=bq,
        k_bias=bk,
        v_bias=bv,
        out_bias=mha.out_proj.bias.detach().numpy(),
    )


@pytest.mark.parametrize("cross", [False, True])
def test_multihead_matches_torch(isa: str, cross: bool) -> None:
    torch.manual_seed(0)
    e, h, b, lq, lk = 64, 4, 2, 33, 45 if cross else 33
    kdim, vdim = (24, 40) if cross else (e, e)
    mha = torch.nn.MultiheadAttention(e, h, batch_first=True, kdim=kdim, vdim=vdim).double()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    query = torch.randn(b, lq, e, dtype=torch.float64)
    key = torch.randn(b, lk, kdim, dtype=torch.float64) if cross else query
    value = torch.randn(b, lk, vdim, dtype=torch.float64) if cross else query
    lengths = np.array([lk, lk - 7], dtype=np.int64)
    padding = torch.arange(lk)[None, :] >= torch.from_numpy(lengths)[:, None]
    ref, ref_w = mha(
        query, key, value, key_padding_mask=padding, need_weights=True, average_attn_weights=False
    )
    w = {n: (None if a is None else a.astype(np.float32)) for n, a in _mha_weights(mha).items()}
    out, lse, weights = _native.multihead(
        *(x.float().numpy() for x in (query, key, value)),
        **w,
        num_heads=h,
        num_kv_heads=h,
        scale=(e // h) ** -0.5,
        key_lengths=lengths,
        return_weights=True,
    )
    assert out.shape == (b, lq, e) and lse.shape == (b, h, lq) and weights.shape == (b, h, lq, lk)
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=ATOL)
    np.testing.assert_allclose(weights, ref_w.detach().numpy(), atol=1e-5)


def test_multihead_gqa_and_causal_against_reference() -> None:
    rng = np.random.default_rng(10)
    b, lq, lk, e, h, hkv, kdim, vdim = 2, 30, 41, 48, 6, 2, 20, 28
    hd = e // h
    x, kx, vx = rand(rng, b, lq, e), rand(rng, b, lk, kdim), rand(rng, b, lk, vdim)
    wq, wk, wv, wo = (
        rand(rng, *s) * 0.2 for s in ((e, e), (hkv * hd, kdim), (hkv * hd, vdim), (e, e))
    )
    bo = rand(rng, e)
    out, lse, _ = _native.multihead(
        x, kx, vx, wq, wk, wv, wo, None, None, None, bo,
        num_heads=h, num_kv_heads=hkv, scale=hd**-0.5, causal=2, window_left=9,
    )  # fmt: skip
    f = lambda a: torch.from_numpy(a).double()  # noqa: E731
    qh = (f(x) @ f(wq).T).reshape(b, lq, h, hd).transpose(1, 2).numpy()
    kh = (f(kx) @ f(wk).T).reshape(b, lk, hkv, hd).transpose(1, 2).numpy()
    vh = (f(vx) @ f(wv).T).reshape(b, lk, hkv, hd).transpose(1, 2).numpy()
    o, ref_lse, _ = reference(qh, kh, vh, scale=hd**-0.5, causal=2, window_left=9)
    ref = o.transpose(1, 2).reshape(b, lq, e) @ f(wo).T + f(bo)
    np.testing.assert_allclose(out, ref.numpy(), atol=ATOL)
    np.testing.assert_allclose(lse, ref_lse.numpy(), atol=ATOL)


def test_multihead_projection_sizes_not_multiple_of_blocks() -> None:
    """E, kdim and rows that are not multiples of the GEMM blocking (edge panels)."""
    rng = np.random.default_rng(11)
    b, n, e, h = 3, 101, 30, 3
    x = rand(rng, b, n, e)
    ws = [rand(rng, e, e) * 0.3 for _ in range(4)]
    bs = [rand(rng, e) for _ in range(4)]
    out, _, _ = _native.multihead(x, x, x, *ws, *bs, num_heads=h, num_kv_heads=h, scale=0.3)
    mha = torch.nn.MultiheadAttention(e, h, batch_first=True).double()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.from_numpy(np.concatenate(ws[:3])))
        mha.in_proj_bias.copy_(torch.from_numpy(np.concatenate(bs[:3])))
        mha.out_proj.weight.copy_(torch.from_numpy(ws[3]))
        mha.out_proj.bias.copy_(torch.from_numpy(bs[3]))
    # torch scales by 1/sqrt(hd) = 1/sqrt(10); ours is given explicitly.
    out_std, _, _ = _native.multihead(
        x, x, x, *ws, *bs, num_heads=h, num_kv_heads=h, scale=10**-0.5
    )
    xt = torch.from_numpy(x).double()
    ref, _ = mha(xt, xt, xt, need_weights=False)
    np.testing.assert_allclose(out_std, ref.detach().numpy(), atol=ATOL)
    assert not np.allclose(out, out_std)  # the scale argument is honoured


# ---------------------------------------------------------------------------------------------
# threads


def test_thread_counts_give_identical_results() -> None:
    rng = np.random.default_rng(12)
    q, k, v = rand(rng, 2, 4, 300, 64), rand(rng, 2, 4, 300, 64), rand(rng, 2, 4, 300, 64)
    one = _native.attention(q, k, v, scale=0.125, causal=1, num_threads=1)
    two = _native.attention(q, k, v, scale=0.125, causal=1, num_threads=2)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    previous = _native.get_num_threads()
    try:
        _native.set_num_threads(1)
        assert _native.get_num_threads() == 1
        np.testing.assert_array_equal(_native.attention(q, k, v, scale=0.125, causal=1)[0], one[0])
    finally:
        _native.set_num_threads(previous)


def test_concurrent_calls_from_python_threads() -> None:
    rng = np.random.default_rng(13)
    cases = []
    for t in range(6):
        q, k, v = rand(rng, 1, 4, 150 + t, 32), rand(rng, 1, 4, 170, 32), rand(rng, 1, 4, 170, 32)
        kw = dict(scale=0.2, causal=t % 3, window_left=50 if t % 2 else -1)
        cases.append((q, k, v, kw, reference(q, k, v, **kw)[0].numpy()))
    errors: list[BaseException] = []

    def worker(case: tuple) -> None:
        q, k, v, kw, expected = case
        try:
            for _ in range(5):
                out, _, _ = _native.attention(q, k, v, num_threads=2, **kw)
                np.testing.assert_allclose(out, expected, atol=ATOL)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def _attention_in_child(q: np.ndarray, conn: object) -> None:
    conn.send(_native.attention(q, q, q, scale=0.2, num_threads=2)[0])  # type: ignore[attr-defined]


def test_forked_child_gets_a_working_thread_pool() -> None:
    """A child forked after the pool started (no workers in it) still completes its calls."""
    import multiprocessing

    q = rand(np.random.default_rng(18), 1, 4, 300, 32)
    parent_out = _native.attention(q, q, q, scale=0.2, num_threads=2)[0]
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe()
    child = ctx.Process(target=_attention_in_child, args=(q, send))
    child.start()
    assert recv.poll(60), "the forked child did not answer"
    np.testing.assert_array_equal(recv.recv(), parent_out)
    child.join(10)


def test_gil_is_released_while_computing() -> None:
    """Another Python thread runs while a long native call is in progress."""
    rng = np.random.default_rng(16)
    q, k, v = rand(rng, 1, 8, 1200, 64), rand(rng, 1, 8, 1200, 64), rand(rng, 1, 8, 1200, 64)
    started = threading.Event()
    times: dict[str, float] = {}

    def call() -> None:
        started.set()
        for _ in range(3):
            _native.attention(q, k, v, scale=0.125, num_threads=1)
        times["end"] = time.perf_counter()

    t = threading.Thread(target=call)
    t.start()
    started.wait()
    time.sleep(0.02)
    times["main"] = time.perf_counter()  # would wait for the GIL until the call returned
    t.join()
    assert times["main"] < times["end"]


# ---------------------------------------------------------------------------------------------
# cancellation


def test_a_cancel_flag_set_during_a_call_stops_it_early() -> None:
    """Set from another thread while the kernel runs: the call raises long before it would end."""
    rng = np.random.default_rng(30)
    q, k, v = (rand(rng, 1, 4, 8192, 64) for _ in range(3))
    start = time.perf_counter()
    _native.attention(q, k, v, scale=0.125)
    uncancelled = time.perf_counter() - start

    flag = _native.CancelFlag()
    timer = threading.Timer(0.05, flag.set)
    start = time.perf_counter()
    timer.start()
    with pytest.raises(_native.Cancelled, match="cancelled"):
        _native.attention(q, k, v, scale=0.125, cancel=flag)
    cancelled = time.perf_counter() - start
    timer.join()
    assert flag.is_set()
    assert issubclass(_native.Cancelled, RuntimeError)
    # Relative, not absolute: the call stops after about one work item per thread.
    assert cancelled < uncancelled / 2, (cancelled, uncancelled)


def test_an_unset_cancel_flag_changes_nothing() -> None:
    rng = np.random.default_rng(31)
    q, k, v = (rand(rng, 2, 3, 300, 32) for _ in range(3))
    flag = _native.CancelFlag()
    plain = _native.attention(q, k, v, scale=0.2, causal=1, return_weights=True)
    flagged = _native.attention(q, k, v, scale=0.2, causal=1, return_weights=True, cancel=flag)
    for a, b in zip(plain, flagged, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not flag.is_set()


def test_every_entry_point_honours_a_cancel_flag() -> None:
    rng = np.random.default_rng(32)
    x = rand(rng, 1, 64, 32)
    w = [rand(rng, 32, 32) for _ in range(4)]
    q, k, v = (rand(rng, 1, 2, 64, 16) for _ in range(3))
    flag = _native.CancelFlag()
    flag.set()  # already set: refused before any work
    with pytest.raises(_native.Cancelled):
        _native.attention(q, k, v, scale=0.25, cancel=flag)
    with pytest.raises(_native.Cancelled):
        _native.multihead(x, x, x, *w, num_heads=4, num_kv_heads=4, scale=0.25, cancel=flag)
    with pytest.raises(_native.Cancelled):
        _native.attention_maps(q, k, v, scale=0.25, bins_q=4, bins_k=4, cancel=flag)
    # The flag belongs to one call: a fresh one computes normally afterwards.
    out, _, _ = _native.attention(q, k, v, scale=0.25, cancel=_native.CancelFlag())
    np.testing.assert_allclose(out, reference(q, k, v, scale=0.25)[0].numpy(), atol=ATOL)


# ---------------------------------------------------------------------------------------------
# dispatch and errors


def _in_subprocess(code: str, **env: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip() + result.stderr.strip()


def test_environment_variables_set_isa_and_threads() -> None:
    code = "from service import _native as n; print(n.isa(), n.get_num_threads())"
    assert _in_subprocess(code, ATTN_ISA="baseline", ATTN_NUM_THREADS="3") == "baseline 3"
    out = _in_subprocess(code, ATTN_ISA="sse9", ATTN_NUM_THREADS="many")
    assert "ATTN_ISA ignored" in out and "ATTN_NUM_THREADS ignored" in out


def test_isa_selection() -> None:
    assert "baseline" in ISAS
    assert _native.isa() in ISAS
    with pytest.raises(ValueError, match="unknown instruction set"):
        _native.set_isa("sse9")
    for name in ("baseline", "avx2", "avx512"):
        if name not in ISAS:
            with pytest.raises(ValueError, match="not supported"):
                _native.set_isa(name)


def test_the_instruction_sets_offered_are_those_this_cpu_runs() -> None:
    """Dispatch (CPUID) agrees with the kernel's view of the CPU: a set is offered exactly when
    the CPU has all it needs. The `isa` tests above run on each one offered; a built set this
    CPU cannot run is skipped there with the reason."""
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    assert flags, "no flags line in /proc/cpuinfo"
    assert sorted(ISAS) == sorted(name for name, needs in REQUIRES.items() if needs <= flags)


def _qkv(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return rand(rng, 2, 4, 8, 16), rand(rng, 2, 2, 8, 16), rand(rng, 2, 2, 8, 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda q, k, v, kw: (q, k[0], v, kw),
            r"^k: expected 4 dimensions \(B, Hkv, Lk, D\), got 3",
        ),
        (lambda q, k, v, kw: (q, k[..., :8], v, kw), r"^q and k: head dim differs \(16 vs 8\)"),
        (lambda q, k, v, kw: (q[:, :3], k, v, kw), "3 query heads are not a multiple of 2 kv"),
        (lambda q, k, v, kw: (q.astype(np.float64), k, v, kw), "^q: expected dtype float32"),
        (lambda q, k, v, kw: (q[..., ::2], k[..., ::2], v, kw), "^q: the last axis must be contig"),
        (lambda q, k, v, kw: (q, k, v[:, :, :5], kw), "^k and v: sequence length differs"),
        (lambda q, k, v, kw: (q[..., :0], k[..., :0], v, kw), "^q: head dim D must be > 0"),
        (lambda q, k, v, kw: (q.tolist(), k, v, kw), "^q: expected a numpy array, got list"),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "mask": np.ones((2, 4, 8, 7), bool)}),
            r"^mask: shape must be \(B, Hq, Lq, Lk\) = \(2, 4, 8, 8\)",
        ),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "mask": np.ones((2, 4, 8, 8), np.int32)}),
            "^mask: expected dtype bool or float32",
        ),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "key_lengths": np.array([9, 1])}),
            "^key_lengths: value 9 at index 0 exceeds Lk=8",
        ),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "key_lengths": np.array([-1, 1])}),
            "^key_lengths: value -1 at index 0 is negative",
        ),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "key_lengths": np.array([1, 1, 1])}),
            r"^key_lengths: expected shape \(B,\)",
        ),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "global_tokens": np.array([1, 12])}),
            r"^global_tokens: position 12 outside \[0, 8\)",
        ),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "global_tokens": np.array([3, 1])}),
            "^global_tokens: must be sorted and unique",
        ),
        (lambda q, k, v, kw: (q, k, v, {**kw, "dilation": 0}), "^dilation: must be >= 1, got 0"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "window_left": -2}), "^window_left: must be >= 0"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "causal": 3}), "^causal: expected 0"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "softcap": -1.0}), "^softcap: must be >= 0"),
        (lambda q, k, v, kw: (q, k, v, {**kw, "scale": float("nan")}), "^scale: must be finite"),
        (
            lambda q, k, v, kw: (q, k, v, {**kw, "alibi_slopes": np.ones(3, np.float32)}),
            r"^alibi_slopes: expected shape \(Hq,\) = \(4,\)",
        ),
        (lambda q, k, v, kw: (q, k, v, {**kw, "num_threads": -1}), "^num_threads: must be >= 0"),
    ],
)
def test_bad_attention_inputs_raise_value_error_naming_the_argument(change, message) -> None:
    q, k, v = _qkv(np.random.default_rng(14))
    q2, k2, v2, kw = change(q, k, v, {"scale": 1.0})
    with pytest.raises(ValueError, match=message):
        _native.attention(q2, k2, v2, **kw)


def test_bad_multihead_inputs_raise_value_error_naming_the_argument() -> None:
    rng = np.random.default_rng(15)
    x = rand(rng, 2, 5, 12)
    w = rand(rng, 12, 12)
    kv = rand(rng, 4, 12)
    base = dict(num_heads=6, num_kv_heads=2, scale=1.0)
    _native.multihead(x, x, x, w, kv, kv, w, **base)  # valid: hd = 2, kv_out = 4
    with pytest.raises(ValueError, match="^num_heads: 6 query heads are not a multiple of 4 kv"):
        _native.multihead(x, x, x, w, kv, kv, w, **{**base, "num_kv_heads": 4})
    with pytest.raises(ValueError, match="^num_heads: embed dim 12 is not divisible by 5 heads"):
        _native.multihead(x, x, x, w, kv, kv, w, **{**base, "num_heads": 5, "num_kv_heads": 1})
    with pytest.raises(
        ValueError, match=r"^k_weight: expected shape .* = \(4, 12\), got \(12, 12\)"
    ):
        _native.multihead(x, x, x, w, w, kv, w, **base)
    with pytest.raises(ValueError, match=r"^out_bias: expected shape \(E,\)"):
        _native.multihead(x, x, x, w, kv, kv, w, None, None, None, np.ones(3, np.float32), **base)
    with pytest.raises(ValueError, match="^key: batch size 1 differs from query's 2"):
        _native.multihead(x, x[:1], x, w, kv, kv, w, **base)
    with pytest.raises(ValueError, match="^query: expected 3 dimensions"):
        _native.multihead(x[0], x, x, w, kv, kv, w, **base)
    with pytest.raises(ValueError, match=r"^mask: shape must be \(B, Hq, Lq, Lk\)"):
        _native.multihead(x, x, x, w, kv, kv, w, mask=np.ones((2, 2, 5, 5), bool), **base)
    with pytest.raises(ValueError, match="^n: must be >= 1"):
        _native.set_num_threads(0)


def test_multihead_refuses_projected_sizes_that_overflow() -> None:
    # Zero-stride views claim (16, 2^30, 2^30) keys from 64 bytes: the projection scratch
    # B*Lk*kv_out overflows int64. It used to wrap around and crash in the allocation.
    from numpy.lib.stride_tricks import as_strided

    x = np.zeros(16, np.float32)
    b, lk, e = 16, 2**30, 2**30
    q = as_strided(x, (b, 0, e), (0, 0, 4))
    k = as_strided(x, (b, lk, 1), (0, 0, 4))
    wq = as_strided(x, (e, e), (0, 0))
    wkv = as_strided(x, (e, 1), (0, 0))
    with pytest.raises(ValueError, match=r"^key: projected size \(16, 1073741824, 1073741824\)"):
        _native.multihead(q, k, k, wq, wkv, wkv, wq, num_heads=1, num_kv_heads=1, scale=1.0)
