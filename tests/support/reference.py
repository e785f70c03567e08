"""Independent references: float64 torch computations of the service's semantics, and the
random inputs the tests feed both sides.

reference_attention builds the full (B, Hq, Lq, Lk) score matrix and a boolean "allowed"
matrix straight from the documented rules, then applies a plain softmax; torch_mha runs
torch.nn.MultiheadAttention itself; reference_multihead projects, runs reference_attention and
projects back, for grouped-query heads that torch's module lacks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def random_qkv(
    b: int,
    hq: int,
    hkv: int,
    lq: int,
    lk: int,
    d: int,
    dv: int | None = None,
    *,
    seed: int | np.random.Generator = 0,
    dtype: type | None = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv = D by default): standard normals
    drawn in that order from `seed` (a seed or a Generator); dtype None keeps float64."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    shapes = ((b, hq, lq, d), (b, hkv, lk, d), (b, hkv, lk, d if dv is None else dv))
    q, k, v = (rng.standard_normal(shape) for shape in shapes)
    if dtype is None:
        return q, k, v
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@dataclass
class Reference:
    output: torch.Tensor  # (B, Hq, Lq, Dv)
    weights: torch.Tensor  # (B, Hq, Lq, Lk), empty rows are 0
    lse: torch.Tensor  # (B, Hq, Lq), -inf for empty rows
    allowed: torch.Tensor  # (B, Hq, Lq, Lk) bool


def f64(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().double()
    return torch.from_numpy(np.array(x, dtype=np.float64))  # a copy: any strides are fine


def standard_alibi_slopes(num_heads: int) -> list[float]:
    return [2.0 ** (-8.0 * (h + 1) / num_heads) for h in range(num_heads)]


def allowed_matrix(
    shape: tuple[int, int, int, int],
    *,
    causal: bool | str = False,
    bool_mask: torch.Tensor | None = None,
    key_lengths: list[int] | None = None,
    window: dict | None = None,
    global_tokens: list[int] | None = None,
) -> torch.Tensor:
    """Which key j each query i of each (batch, head) may attend to."""
    b, h, lq, lk = shape
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    c = i + lk - lq  # the query row's aligned key position ("bottom right")
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool)
    if bool_mask is not None:
        allowed &= bool_mask.broadcast_to(shape)
    if causal is True or causal == "top_left":
        allowed &= j <= i
    elif causal == "bottom_right":
        allowed &= j <= c
    if window is not None:
        dil = window.get("dilation", 1)
        delta = j - c
        in_window = delta % dil == 0
        if window.get("left") is not None:
            in_window &= delta >= -window["left"] * dil
        if window.get("right") is not None:
            in_window &= delta <= window["right"] * dil
        if global_tokens:
            g = torch.tensor(global_tokens)
            in_window |= torch.isin(j, g)  # global keys are seen by everyone
            in_window |= torch.isin(c, g)  # global query rows see everything
        allowed &= in_window
    if key_lengths is not None:
        lengths = torch.tensor(key_lengths)[:, None, None, None]
        allowed &= j[None, None] < lengths
    return allowed


def reference_attention(
    q: np.ndarray | torch.Tensor,
    k: np.ndarray | torch.Tensor,
    v: np.ndarray | torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool | str = False,
    mask: np.ndarray | torch.Tensor | None = None,
    mask_convention: str = "attend",
    key_lengths: list[int] | None = None,
    window: dict | None = None,
    global_tokens: list[int] | None = None,
    alibi_slopes: list[float] | bool | None = None,
    softcap: float | None = None,
) -> Reference:
    """4-D inputs (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv); returns float64 results."""
    q, k, v = f64(q), f64(k), f64(v)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    scale = 1.0 / d**0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is True:
        alibi_slopes = standard_alibi_slopes(hq)
    if alibi_slopes:
        i = torch.arange(lq)[:, None]
        j = torch.arange(lk)[None, :]
        dist = (i + lk - lq - j).abs().double()
        s = s - torch.tensor(alibi_slopes, dtype=torch.float64)[:, None, None] * dist
    bool_mask = None
    if mask is not None:
        m = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(np.array(mask))
        if m.dtype == torch.bool:
            bool_mask = ~m if mask_convention == "ignore" else m
        else:
            s = s + m.double()
    allowed = allowed_matrix(
        (b, hq, lq, lk),
        causal=causal,
        bool_mask=bool_mask,
        key_lengths=key_lengths,
        window=window,
        global_tokens=global_tokens,
    )
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)[..., None]
    p = torch.where(finite, torch.exp(s - torch.where(finite, lse[..., None], 0.0)), 0.0)
    return Reference(output=p @ v, weights=p, lse=lse, allowed=allowed)


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
    x: torch.Tensor, w: Any, num_heads: int, *, rope: bool, causal: bool
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


def torch_mha(w: Any, e: int, h: int, kdim: int, vdim: int) -> torch.nn.MultiheadAttention:
    """A float64 torch.nn.MultiheadAttention(batch_first=True) holding exactly the weights `w`
    (a MultiheadWeights; no biases when it has none), in eval mode."""
    bias = w.q_bias is not None
    mha = torch.nn.MultiheadAttention(
        e, h, bias=bias, batch_first=True, kdim=kdim, vdim=vdim, dtype=torch.float64
    )
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    with torch.no_grad():
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([t(w.q_proj), t(w.k_proj), t(w.v_proj)]))
        else:
            mha.q_proj_weight.copy_(t(w.q_proj))
            mha.k_proj_weight.copy_(t(w.k_proj))
            mha.v_proj_weight.copy_(t(w.v_proj))
        mha.out_proj.weight.copy_(t(w.out_proj))
        if bias:
            mha.in_proj_bias.copy_(torch.cat([t(w.q_bias), t(w.k_bias), t(w.v_bias)]))
            mha.out_proj.bias.copy_(t(w.out_bias))
    return mha.eval()


def reference_multihead(
    x: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    w: Any,
    h: int,
    hkv: int,
    **opts: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-head attention with grouped-query heads in float64: the projections of `w` (a
    MultiheadWeights), reference_attention with `opts`, then out_proj.

    Returns (output, weights per head, lse)."""
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float64))  # noqa: E731
    b, lq, e = x.shape
    lk, hd = key.shape[1], e // h

    def heads(inp: np.ndarray, weight: np.ndarray, bias: np.ndarray, n: int, length: int):
        y = t(inp) @ t(weight).T + t(bias)
        return y.reshape(b, length, n, hd).transpose(1, 2)

    q = heads(x, w.q_proj, w.q_bias, h, lq)
    k = heads(key, w.k_proj, w.k_bias, hkv, lk)
    v = heads(value, w.v_proj, w.v_bias, hkv, lk)
    ref = reference_attention(q, k, v, **opts)
    concat = ref.output.transpose(1, 2).reshape(b, lq, e)
    return concat @ t(w.out_proj).T + t(w.out_bias), ref.weights, ref.lse


def bin_means(w: np.ndarray, pq: int, pk: int) -> np.ndarray:
    """(.., Lq, Lk) -> (.., pq, pk) means over the documented near-equal bins, whose edges are
    floor(i * L / P), computed cell by cell with plain loops."""
    lq, lk = w.shape[-2:]
    qe = [i * lq // pq for i in range(pq + 1)]
    ke = [j * lk // pk for j in range(pk + 1)]
    out = np.empty(w.shape[:-2] + (pq, pk))
    for a in range(pq):
        for b in range(pk):
            out[..., a, b] = w[..., qe[a] : qe[a + 1], ke[b] : ke[b + 1]].mean(axis=(-2, -1))
    return out


def row_entropy(w: np.ndarray) -> np.ndarray:
    """-sum p ln p over the last axis (0 for rows of zeros)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(w > 0, w * np.log(w), 0.0).sum(-1)
