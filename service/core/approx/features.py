"""Feature maps of the feature methods (elu(x)+1, FAVOR+) and the random matrices they draw.

performer_features and linformer_projections are public so that tests can rebuild the same ones.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from service.core.options import AttentionOptions


def default_num_features(dim: int) -> int:
    """FAVOR+'s usual m = ceil(D ln D) (at least 1)."""
    return max(1, math.ceil(dim * math.log(dim)))


@functools.lru_cache(maxsize=16)
def performer_features(dim: int, num_features: int, seed: int = 0) -> np.ndarray:
    """FAVOR+ random feature matrix W (num_features, dim), float64, reproducible per seed.

    Blocks of D orthonormal rows (QR of a Gaussian matrix, sign-corrected to be Haar), each row
    rescaled by the norm of an independent Gaussian vector so that rows are marginally N(0, I).
    Cached (read-only): one QR per block of D features is most of a short call's time.
    """
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-num_features // dim)):  # one QR per block of D features
        gauss = rng.standard_normal((dim, dim))
        qmat, rmat = np.linalg.qr(gauss)
        blocks.append((qmat * np.where(np.diag(rmat) < 0, -1.0, 1.0)).T)
    w = np.concatenate(blocks)[:num_features]
    norms = np.linalg.norm(rng.standard_normal((num_features, dim)), axis=1)
    w = w * norms[:, None]
    w.flags.writeable = False
    return w


def linformer_projections(seq_len: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Linformer's E (for keys) and F (for values), each (k, seq_len) float32.

    Entries +-1/sqrt(seq_len) with random signs (Rademacher; random bytes are far cheaper to
    draw than k * Lk normals). The scale keeps a projected row at the magnitude of one key or
    value, as the reference implementation's Xavier-initialised projection does. The paper's
    N(0, 1/k) entries make projected keys sqrt(Lk / k) times longer, which saturates the
    softmax: relative error 93 instead of 4 on random inputs at L = 4096, k = 256.
    """
    n = 2 * k * seq_len
    rng = np.random.default_rng(seed)
    bits = np.unpackbits(np.frombuffer(rng.bytes(-(-n // 8)), dtype=np.uint8), count=n)
    signs = np.float32(2.0 / math.sqrt(seq_len)) * bits.astype(np.float32)
    signs -= np.float32(1.0 / math.sqrt(seq_len))
    return signs[: n // 2].reshape(k, seq_len), signs[n // 2 :].reshape(k, seq_len)


def _elu1(x: np.ndarray) -> np.ndarray:
    """elu(x) + 1 = exp(min(x, 0)) + max(x, 0): x + 1 above 0, exp(x) below (always > 0)."""
    out = np.exp(np.minimum(x, 0))
    out += np.maximum(x, 0)
    return out


def _performer_phi(
    x: np.ndarray, w: np.ndarray, key_valid: np.ndarray | None, *, is_query: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Positive random features of queries or keys (..., L, m), and their log shifts.

    Queries are shifted by their own row max; keys by one max over each (batch, head), taken
    over valid keys only (key_valid (B, 1, L) or None) so that padding cannot underflow the real
    keys. Returns (phi, shift) with phi_true = phi * exp(shift), shift (..., L) for queries and
    (B, H, 1) for keys.
    """
    z = x @ w.T.astype(x.dtype)
    half_sq = 0.5 * np.einsum("...d,...d->...", x, x)  # (..., L)
    row_max = z.max(axis=-1)  # the max of z - half_sq over a row is row_max - half_sq
    if is_query:
        z -= row_max[..., None]
        shift = row_max - half_sq
    else:
        top = row_max - half_sq
        if key_valid is not None:
            top = np.where(key_valid, top, -np.inf)
        shift = top.max(axis=-1, keepdims=True)  # (B, H, 1)
        shift = np.where(np.isfinite(shift), shift, 0)  # no valid key: features are zeroed
        z -= (half_sq + shift)[..., None]
    np.exp(z, out=z)
    if key_valid is not None:
        z *= key_valid[..., None]
    half_log_m = 0.5 * math.log(w.shape[0])
    return z, (shift - half_log_m).astype(x.dtype)


def last_keys(lq: int, lk: int, causal: str | None) -> np.ndarray | None:
    """Per query, the index of its last allowed key (-1: none), or None when not causal."""
    if causal is None:
        return None
    offset = 0 if causal == "top_left" else lk - lq
    return np.clip(np.arange(lq) + offset, -1, lk - 1)


def key_valid(b: int, lk: int, opts: AttentionOptions) -> np.ndarray | None:
    """(B, 1, Lk) bool of non-padded keys, or None without key_lengths."""
    if opts.key_lengths is None:
        return None
    return (np.arange(lk) < np.asarray(opts.key_lengths)[:, None])[:, None, :]


@dataclass
class Features:
    """Everything needed to form outputs and implied maps of a feature method."""

    phiq: np.ndarray  # (B, Hkv, G, Lq, F)
    phik: np.ndarray  # (B, Hkv, Lk, F), padded keys zeroed
    log_shift: np.ndarray  # broadcastable to (B, Hkv, G, Lq): log of the factor phi dropped
    last: np.ndarray | None  # (Lq,) last allowed key, or None


def features(q: np.ndarray, k: np.ndarray, opts: AttentionOptions) -> tuple[Features, int]:
    """Feature maps of q (B, Hq, Lq, D) and k (B, Hkv, Lk, D); also the feature-map flops."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1:3]
    valid = key_valid(b, lk, opts)
    qg = q.reshape(b, hkv, hq // hkv, lq, d)
    if opts.method == "linear":
        phiq, phik = _elu1(qg), _elu1(k)
        if valid is not None:
            phik *= valid[..., None]
        shift = np.zeros((1, 1, 1, 1), dtype=q.dtype)
        flops = 0
    else:
        m = opts.num_features or default_num_features(d)
        w = performer_features(d, m, opts.seed or 0)
        scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(d)
        root = math.sqrt(abs(scale))
        # sign(scale) on the query side keeps q.k * scale exact for a negative scale
        xq = qg * q.dtype.type(math.copysign(root, scale))
        phiq, qshift = _performer_phi(xq, w, None, is_query=True)
        phik, kshift = _performer_phi(k * k.dtype.type(root), w, valid, is_query=False)
        shift = qshift + kshift[:, :, None]
        flops = 2 * b * (hq * lq + hkv * lk) * m * d
    return Features(phiq, phik, shift, last_keys(lq, lk, opts.causal_mode)), flops
