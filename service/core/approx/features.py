"""Feature maps of the feature methods (elu(x)+1, FAVOR+) and the random matrices they draw.

performer_features and linformer_projections are public so that tests can rebuild the same ones.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from service.core.cancel import ELEMENTWISE, STEP, blocks, checkpoint
from service.core.options import AttentionOptions


def default_num_features(dim: int) -> int:
    """FAVOR+'s usual m = ceil(D ln D) (at least 1)."""
    return max(1, math.ceil(dim * math.log(dim)))


class _FeatureCache:
    """performer_features' matrices, least recently used out, held to MAX_BYTES in total.

    One QR per block of D features is most of a short call's time, so matrices are kept; but
    a matrix is m x D float64 (m and D chosen by the caller), so the cache is bounded in
    bytes, not entries, and a matrix larger than a quarter of it is not kept at all.
    """

    MAX_BYTES = 64 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self.bytes = 0

    def get(self, key: tuple[int, int, int]) -> np.ndarray | None:
        with self._lock:
            w = self._entries.get(key)
            if w is not None:
                self._entries.move_to_end(key)
            return w

    def put(self, key: tuple[int, int, int], w: np.ndarray) -> None:
        if w.nbytes > self.MAX_BYTES // 4:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = w
            self.bytes += w.nbytes
            while self.bytes > self.MAX_BYTES:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0


FEATURE_CACHE = _FeatureCache()


def performer_features(dim: int, num_features: int, seed: int = 0) -> np.ndarray:
    """FAVOR+ random feature matrix W (num_features, dim), float64, reproducible per seed.

    Blocks of D orthonormal rows (QR of a Gaussian matrix, sign-corrected to be Haar), each row
    rescaled by the norm of an independent Gaussian vector so that rows are marginally N(0, I).
    Cached, read-only (FEATURE_CACHE). Each QR is a cancellation checkpoint: an abandoned job
    stops between blocks. Memory: W plus a few D x D blocks (service.core.cost).
    """
    key = (dim, num_features, seed)
    cached = FEATURE_CACHE.get(key)
    if cached is not None:
        return cached
    rng = np.random.default_rng(seed)
    w = np.empty((num_features, dim))
    for start in range(0, num_features, dim):  # one QR per block of D features
        checkpoint()
        gauss = rng.standard_normal((dim, dim))
        qmat, rmat = np.linalg.qr(gauss)
        qmat *= np.where(np.diag(rmat) < 0, -1.0, 1.0)
        stop = min(num_features, start + dim)
        w[start:stop] = qmat.T[: stop - start]
    # Row norms of a (num_features, dim) Gaussian, drawn a block of rows at a time (the same
    # stream as one draw) so that the matrix itself is never held.
    for rows in blocks(num_features, dim, step=dim * dim):
        w[rows] *= np.linalg.norm(rng.standard_normal((rows.stop - rows.start, dim)), axis=1)[
            :, None
        ]
    w.flags.writeable = False
    FEATURE_CACHE.put(key, w)
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
    root = math.sqrt(max(seq_len, 1))  # no keys: empty matrices
    signs = np.empty(n, np.float32)
    # Drawn a step at a time (with a checkpoint before each): a whole-length draw is seconds
    # at the largest sizes. Pieces of whole 32-bit words draw the same stream as one call.
    for part in blocks(n, ELEMENTWISE, step=max(32, STEP // 32 * 32)):
        count = part.stop - part.start
        bits = np.unpackbits(np.frombuffer(rng.bytes(-(-count // 8)), np.uint8), count=count)
        piece = signs[part]
        piece[:] = bits
        piece *= np.float32(2.0 / root)
        piece -= np.float32(1.0 / root)
    return signs[: n // 2].reshape(k, seq_len), signs[n // 2 :].reshape(k, seq_len)


def _elu1(x: np.ndarray) -> np.ndarray:
    """elu(x) + 1 = exp(min(x, 0)) + max(x, 0): x + 1 above 0, exp(x) below (always > 0).

    A block of rows at a time (four elementwise passes each), with a checkpoint before each."""
    out = np.empty_like(x)
    n, lead = x.shape[-2], math.prod(x.shape[:-2])
    for rows in blocks(n, lead * x.shape[-1] * 4 * ELEMENTWISE):
        block, part = out[..., rows, :], x[..., rows, :]
        np.minimum(part, 0, out=block)
        np.exp(block, out=block)
        block += np.maximum(part, 0)
    return out


def _performer_phi(
    x: np.ndarray, w: np.ndarray, key_valid: np.ndarray | None, *, is_query: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Positive random features of queries or keys (..., L, m), and their log shifts.

    Queries are shifted by their own row max; keys by one max over each (batch, head), taken
    over valid keys only (key_valid (B, 1, L) or None) so that padding cannot underflow the real
    keys. Returns (phi, shift) with phi_true = phi * exp(shift), shift (..., L) for queries and
    (B, H, 1) for keys. Computed a block of rows at a time (service.core.cancel.blocks).
    """
    m, d = w.shape
    n, lead = x.shape[-2], math.prod(x.shape[:-2])
    wt = w.T.astype(x.dtype)
    z = np.empty((*x.shape[:-1], m), x.dtype)
    row_max = np.empty(x.shape[:-1], x.dtype)
    for rows in blocks(n, lead * d * m):
        z[..., rows, :] = x[..., rows, :] @ wt
        row_max[..., rows] = z[..., rows, :].max(axis=-1)
    half_sq = 0.5 * np.einsum("...d,...d->...", x, x)  # (..., L)
    # the max of z - half_sq over a row is row_max - half_sq
    if is_query:
        shift = row_max - half_sq
        offset = row_max
    else:
        top = row_max - half_sq
        if key_valid is not None:
            top = np.where(key_valid, top, -np.inf)
        shift = top.max(axis=-1, keepdims=True)  # (B, H, 1)
        shift = np.where(np.isfinite(shift), shift, 0)  # no valid key: features are zeroed
        offset = half_sq + shift
    for rows in blocks(n, lead * m * ELEMENTWISE):
        block = z[..., rows, :]
        block -= offset[..., rows, None]
        np.exp(block, out=block)
        if key_valid is not None:
            block *= key_valid[..., rows, None]
    half_log_m = 0.5 * math.log(m)
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
