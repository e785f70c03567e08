"""The tokens pipeline: embeddings -> positional encoding -> multi-head self-attention.

- Embeddings are deterministic per (token, seed): each vector is drawn from a numpy Generator
  seeded with a BLAKE2b hash of the pair (never Python's hash(), which changes per process).
- Positional encoding: "sinusoidal" (Vaswani et al. 2017), "learned" (a table drawn from the
  seed, as a freshly initialised learned table would be), "rope" (rotary position embedding,
  rotating q and k of every head, the half-split convention of GPT-NeoX / LLaMA) or "none".
- Projections are Xavier-uniform from the seed (service.init_multihead_weights) unless given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

from service.core.attention import attention
from service.core.errors import InputError
from service.core.multihead import multihead_attention
from service.core.options import MaskingOptions, MultiheadWeights
from service.core.results import TokensResult
from service.core.weights import (
    checked_arrays,
    head_layout,
    init_multihead_weights,
    parameter_count,
)

Positional = Literal["sinusoidal", "learned", "rope", "none"]

_ROPE_BASE = 10000.0


def _rng(kind: bytes, seed: int, key: bytes = b"") -> np.random.Generator:
    digest = hashlib.blake2b(kind + b"\0" + str(seed).encode() + b"\0" + key, digest_size=16)
    return np.random.default_rng(int.from_bytes(digest.digest(), "little"))


def embed(tokens: Sequence[str], d_model: int, seed: int) -> np.ndarray:
    """(L, d_model) float32: a standard-normal vector per distinct token, fixed by (token, seed)."""
    table = {
        t: _rng(b"token", seed, t.encode("utf-8", "surrogatepass")).standard_normal(d_model)
        for t in dict.fromkeys(tokens)
    }
    out = np.empty((len(tokens), d_model), dtype=np.float32)
    for i, t in enumerate(tokens):
        out[i] = table[t]
    return out


def sinusoidal(length: int, d_model: int) -> np.ndarray:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    freq = _ROPE_BASE ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    angles = pos * freq
    pe = np.empty((length, d_model), dtype=np.float64)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles[:, : d_model // 2])
    return pe.astype(np.float32)


def learned(length: int, d_model: int, seed: int) -> np.ndarray:
    """Rows of a standard-normal table drawn from the seed; row p does not depend on length."""
    return _rng(b"positions", seed).standard_normal((length, d_model)).astype(np.float32)


def rope_tables(length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of p * theta_i, theta_i = 10000^(-2i/head_dim), each (L, head_dim)."""
    theta = _ROPE_BASE ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.arange(length, dtype=np.float64)[:, None] * theta
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x (.., L, head_dim): x*cos + rotate_half(x)*sin (pairs i and i + head_dim/2)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x * cos + rotated * sin).astype(np.float32)


def self_attention(
    tokens: Sequence[str],
    *,
    d_model: int,
    num_heads: int,
    num_kv_heads: int | None,
    positional: Positional,
    seed: int,
    weights: MultiheadWeights | None,
    masking: MaskingOptions,
    num_threads: int | None = None,
) -> TokensResult:
    """Embed, add or apply positions, and run multi-head self-attention over the tokens."""
    length = len(tokens)
    hkv, head_dim = head_layout(d_model, num_heads, num_kv_heads)
    # Only the masking fields: a request model also carries fields (seed, ...) that mean
    # something else to attention().
    masking = MaskingOptions.model_validate(
        {
            f: getattr(masking, f)
            for f in masking.model_fields_set
            if f in MaskingOptions.model_fields
        }
    )
    x = embed(tokens, d_model, seed)
    if positional == "rope":
        if head_dim % 2:
            raise InputError(
                "positional", f"rope needs an even head dim; d_model/num_heads is {head_dim}"
            )
        return _rope_attention(x, num_heads, hkv, head_dim, seed, weights, masking, num_threads)
    table = None
    if positional == "sinusoidal":
        table = sinusoidal(length, d_model)
    elif positional == "learned":
        table = learned(length, d_model, seed)
    if table is not None:
        x = x + table
    res = multihead_attention(
        x,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        weights=weights,
        seed=seed,
        need_weights=True,
        average_weights=False,
        options=masking,
        num_threads=num_threads,
    )
    assert res.weights is not None  # need_weights=True
    return TokensResult(res.output, res.weights, table, res.param_count, res.elapsed_ms, res.flops)


def _rope_attention(
    x: np.ndarray,
    num_heads: int,
    hkv: int,
    head_dim: int,
    seed: int,
    weights: MultiheadWeights | None,
    masking: MaskingOptions,
    num_threads: int | None,
) -> TokensResult:
    """Multi-head self-attention with q and k rotated per head, around service.attention."""
    length, d_model = x.shape
    w = weights or init_multihead_weights(d_model, num_heads, hkv, seed=seed)
    arrays = checked_arrays(w, d_model, hkv * head_dim, d_model, d_model)

    def project(name: str, heads: int) -> np.ndarray:
        y = x @ arrays[name].T  # type: ignore[union-attr]
        bias = arrays[name.replace("proj", "bias")]
        if bias is not None:
            y = y + bias
        return np.ascontiguousarray(y.reshape(length, heads, head_dim).transpose(1, 0, 2))

    cos, sin = rope_tables(length, head_dim)
    q = apply_rope(project("q_proj", num_heads), cos, sin)
    k = apply_rope(project("k_proj", hkv), cos, sin)
    v = project("v_proj", hkv)
    res = attention(q, k, v, masking, return_weights=True, num_threads=num_threads)
    concat = res.output.transpose(1, 0, 2).reshape(length, d_model)
    out = concat @ arrays["out_proj"].T  # type: ignore[union-attr]
    if arrays["out_bias"] is not None:
        out = out + arrays["out_bias"]
    assert res.weights is not None  # return_weights=True
    param_count = parameter_count(arrays)
    proj_flops = 2 * length * d_model * (2 * d_model + 2 * hkv * head_dim)
    return TokensResult(
        out.astype(np.float32),
        res.weights,
        np.concatenate([cos[:, : head_dim // 2], sin[:, : head_dim // 2]], axis=1),
        param_count,
        res.elapsed_ms,
        res.flops + proj_flops,
    )
