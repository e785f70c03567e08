"""Float64 torch reference of the service's attention semantics, through an explicit dense mask.

Independent of the code under test: it builds the full (B, Hq, Lq, Lk) score matrix and a
boolean "allowed" matrix straight from the documented rules, then applies a plain softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


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
