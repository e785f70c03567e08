"""Linear-time approximations of softmax attention, as chains of dense (BLAS) products.

- "linear" (Katharopoulos et al. 2020): phi(x) = elu(x) + 1; out_i = phi(q_i) S / phi(q_i) z
  with S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j). There is no temperature, so no `scale`.
- "performer" (FAVOR+, Choromanski et al. 2021): positive orthogonal random features
  phi(x) = exp(W x - |x|^2 / 2) / sqrt(m), so that E[phi(q).phi(k)] = exp(q.k). q and k are
  first multiplied by sqrt(scale) (default scale 1/sqrt(D), i.e. q / D^(1/4)), which makes it
  an estimate of softmax(scale * q k^T). Stabilised: each query's features are shifted by their
  row max and all keys' by one max per (batch, head); both shifts cancel in the normalisation
  and are added back to the returned log-sum-exp.
- "linformer" (Wang et al. 2020): keys and values projected along the sequence to k rows by
  seeded random-sign matrices E, F (entries +-1/sqrt(Lk), see `linformer_projections`):
  out = softmax(scale * q (E K)^T) (F V). The projections are untrained (the paper learns
  them), so expect a large error; it is shown, not hidden.

Causal masking (linear, performer) runs over key chunks: the queries whose last allowed key
falls in a chunk read the running state of all earlier chunks and take a small masked product
with the chunk itself. Padded keys (key_lengths) have their features zeroed (linformer: their
key and value rows), so they contribute nothing. Rows with no allowed key follow `empty_rows`.

Every function works on (B, H, L, D) arrays in their own float dtype (the Python API passes
float32); query heads are grouped onto key/value heads as (B, Hkv, G, Lq, .) for GQA.
The "implied attention matrix" of a method is the (Lq, Lk) matrix M with output = M V: for
linear and performer the normalised phi(Q) phi(K)^T (non-negative, rows sum to 1); for
linformer softmax(scale * Q (E K)^T) F, a signed operator whose rows need not sum to 1.
With return_weights, linear and performer return M itself and, as lse, the log of their row
normaliser (performer: an estimate of the exact log-sum-exp). "compare" returns M pooled into
at most MAP_SIDE x MAP_SIDE bins of cell means, computed from per-bin sums of phi(K) (and F),
so it never forms Lq x Lk.

BLAS runs on one thread here (see `_serial`), so `num_threads` of the API does not apply.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from threadpoolctl import ThreadpoolController

from service.errors import InputError, LimitError
from service.options import AttentionOptions

Method = Literal["exact", "linear", "performer", "linformer"]

# The options each method accepts (empty_rows and mask_convention are accepted by all).
# Anything else that is set is an InputError naming the method and the option.
SUPPORTED: dict[str, frozenset[str]] = {
    "exact": frozenset(
        {
            "scale",
            "causal",
            "mask",
            "key_lengths",
            "window",
            "global_tokens",
            "alibi_slopes",
            "softcap",
            "return_weights",
        }
    ),
    "linear": frozenset({"causal", "key_lengths", "return_weights", "compare"}),
    "performer": frozenset(
        {"scale", "causal", "key_lengths", "return_weights", "compare", "num_features", "seed"}
    ),
    "linformer": frozenset({"scale", "key_lengths", "compare", "linformer_k", "seed"}),
}

# Why an option is refused, where the reason is not obvious from the method.
_WHY: dict[str, str] = {
    "scale": "its feature map elu(x)+1 has no temperature",
    "causal": "its sequence projection mixes future keys into every projected row",
    "mask": "a per-(query, key) mask needs the Lq x Lk matrix the method avoids",
    "window": "a window needs per-(query, key) masking; use method 'exact'",
    "global_tokens": "global tokens go with a window; use method 'exact'",
    "alibi_slopes": "a per-(query, key) bias does not factor through the features",
    "softcap": "capping acts on individual scores, which the method never forms",
    "return_weights": "its weights are over projected rows, not keys; compare returns its "
    "implied key-by-key map",
    "compare": "it is the reference the others are compared with",
}

CHUNK = 64  # keys per causal chunk: small masked products, few Python iterations
DEFAULT_LINFORMER_K = 256
MAP_SIDE = 256  # implied maps are pooled to at most MAP_SIDE x MAP_SIDE bins
EXACT_MAP_MAX_CELLS = 1 << 24  # compare: the exact map is pooled from dense weights up to this
MAX_FEATURE_ELEMENTS = 1 << 28  # feature matrices held at once (1 GiB in float32)
_ROW_BLOCK = 4096  # query rows per block when pooling implied maps
_BLAS = ThreadpoolController()  # inspects the loaded BLAS once, at import


def _serial() -> Any:
    """One BLAS thread for the whole computation.

    The products here are either small (the causal chunks) or long in their inner dimension
    ((F, Lk) @ (Lk, Dv)), where OpenBLAS synchronises its threads once per block of Lk: on a
    busy machine every barrier waits for a time slice. Measured under load on 2 cores: 1.1-4x
    faster with one thread (e.g. linear causal at L = 64k: 0.54 s instead of 1.14 s); on an
    idle machine two threads would win at most 2x on the products alone.
    """
    return _BLAS.limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class ApproxResult:
    """4-D results of `run`: output (B, Hq, Lq, Dv); weights (B, Hq, Lq, Lk) and lse (B, Hq, Lq)
    when return_weights; comparison as described in `compare`."""

    output: np.ndarray
    weights: np.ndarray | None
    lse: np.ndarray | None
    elapsed_ms: float
    flops: int
    comparison: dict[str, Any] | None


# ---------------------------------------------------------------------------------------------
# Options


def _active(opts: AttentionOptions) -> dict[str, tuple[str | int, ...]]:
    """The options that are set (not at their no-op default), each with the loc to report."""
    active: dict[str, tuple[str | int, ...]] = {}
    checks = {
        "scale": opts.scale is not None,
        "causal": opts.causal_mode is not None,
        "mask": opts.mask is not None,
        "key_lengths": opts.key_lengths is not None,
        "window": opts.window is not None,
        "global_tokens": bool(opts.global_tokens),
        "alibi_slopes": opts.alibi_slopes not in (None, False),
        "softcap": opts.softcap is not None,
        "return_weights": opts.return_weights,
        "compare": opts.compare,
        "num_features": opts.num_features is not None,
        "seed": opts.seed is not None,
        "linformer_k": opts.linformer_k is not None,
    }
    for name, on in checks.items():
        if on:
            active[name] = (name,)
    if opts.window is not None and opts.window.dilation > 1:
        active["window"] = ("window", "dilation")
    return active


def check_options(opts: AttentionOptions) -> None:
    """InputError naming the method and the option when the combination is not supported."""
    supported = SUPPORTED[opts.method]
    for name, loc in _active(opts).items():
        if name in supported:
            continue
        what = ".".join(map(str, loc))
        users = " / ".join(repr(m) for m, s in SUPPORTED.items() if name in s)
        why = _WHY.get(name) or f"'{what}' is only used by method {users}"
        allowed = ", ".join(sorted(supported)) or "none"
        raise InputError(
            loc,
            f"method {opts.method!r} does not support {what!r} ({why}); "
            f"{opts.method!r} accepts: {allowed}",
        )


def default_num_features(dim: int) -> int:
    """FAVOR+'s usual m = ceil(D ln D) (at least 1)."""
    return max(1, math.ceil(dim * math.log(dim)))


# ---------------------------------------------------------------------------------------------
# Random features and projections (public so that tests can rebuild the same ones)


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


# ---------------------------------------------------------------------------------------------
# Feature maps


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


# ---------------------------------------------------------------------------------------------
# Products


def _last_keys(lq: int, lk: int, causal: str | None) -> np.ndarray | None:
    """Per query, the index of its last allowed key (-1: none), or None when not causal."""
    if causal is None:
        return None
    offset = 0 if causal == "top_left" else lk - lq
    return np.clip(np.arange(lq) + offset, -1, lk - 1)


def _feature_attention(
    phiq: np.ndarray, phik: np.ndarray, v: np.ndarray, last: np.ndarray | None, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Numerator (B, Hkv, G, Lq, Dv) and denominator (B, Hkv, G, Lq) of feature attention.

    phiq (B, Hkv, G, Lq, F); phik (B, Hkv, Lk, F) with padded keys zeroed; v (B, Hkv, Lk, Dv).
    v gets a column of ones, so every product yields the denominator as its last column.
    """
    ones = np.ones((*v.shape[:-1], 1), dtype=v.dtype)
    v1 = np.concatenate([v, ones], axis=-1)[:, :, None]  # (B, Hkv, 1, Lk, Dv + 1)
    phik = phik[:, :, None]  # (B, Hkv, 1, Lk, F)
    if last is None:
        nd = phiq @ (phik.swapaxes(-1, -2) @ v1)
        return nd[..., :-1], nd[..., -1]
    nd = np.zeros((*phiq.shape[:-1], v1.shape[-1]), dtype=phiq.dtype)
    state = np.zeros((*phik.shape[:3], phik.shape[-1], v1.shape[-1]), dtype=phiq.dtype)
    _chunk_loop(phiq, phik, v1, last, chunk, nd, state)
    return nd[..., :-1], nd[..., -1]


def _chunk_loop(
    phiq: np.ndarray,
    phik: np.ndarray,
    v1: np.ndarray,
    last: np.ndarray,
    chunk: int,
    nd: np.ndarray,
    state: np.ndarray,
) -> None:
    """The causal scan of `_feature_attention`, filling nd in place."""
    lk = v1.shape[-2]
    # `last` is non-decreasing, so the queries whose last key lies in chunk c are contiguous.
    owner = np.where(last >= 0, last // chunk, -1)
    folded = 0  # keys [0, folded) are summed into state
    for c in range(-(-lk // chunk)):
        i0, i1 = np.searchsorted(owner, [c, c + 1])
        if i0 == i1:
            continue
        s, e = c * chunk, min((c + 1) * chunk, lk)
        if s > folded:
            state += phik[..., folded:s, :].swapaxes(-1, -2) @ v1[..., folded:s, :]
            folded = s
        pq = phiq[..., i0:i1, :]
        a = pq @ phik[..., s:e, :].swapaxes(-1, -2)  # (B, Hkv, G, n, e - s)
        a *= np.arange(s, e) <= last[i0:i1, None]
        nd[..., i0:i1, :] = pq @ state + a @ v1[..., s:e, :]


def _row_counts(b: int, lq: int, lk: int, opts: AttentionOptions) -> np.ndarray:
    """Allowed keys per (batch, query): (B, Lq)."""
    lengths = np.asarray(opts.key_lengths if opts.key_lengths is not None else [lk] * b)
    last = _last_keys(lq, lk, opts.causal_mode)
    per_query = np.full(lq, lk) if last is None else last + 1
    return np.minimum(per_query[None, :], lengths[:, None])


def _key_valid(b: int, lk: int, opts: AttentionOptions) -> np.ndarray | None:
    """(B, 1, Lk) bool of non-padded keys, or None without key_lengths."""
    if opts.key_lengths is None:
        return None
    return (np.arange(lk) < np.asarray(opts.key_lengths)[:, None])[:, None, :]


@dataclass
class _Features:
    """Everything needed to form outputs and implied maps of a feature method."""

    phiq: np.ndarray  # (B, Hkv, G, Lq, F)
    phik: np.ndarray  # (B, Hkv, Lk, F), padded keys zeroed
    log_shift: np.ndarray  # broadcastable to (B, Hkv, G, Lq): log of the factor phi dropped
    last: np.ndarray | None  # (Lq,) last allowed key, or None


def _features(q: np.ndarray, k: np.ndarray, opts: AttentionOptions) -> tuple[_Features, int]:
    """Feature maps of q (B, Hq, Lq, D) and k (B, Hkv, Lk, D); also the feature-map flops."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1:3]
    valid = _key_valid(b, lk, opts)
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
    return _Features(phiq, phik, shift, _last_keys(lq, lk, opts.causal_mode)), flops


def _check_memory(q: np.ndarray, k: np.ndarray, opts: AttentionOptions) -> None:
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1:3]
    if opts.method == "linformer":
        kk = opts.linformer_k or min(lk, DEFAULT_LINFORMER_K)
        n, field = (2 * kk * lk + b * hq * lq * kk), "linformer_k"
    else:
        m = d if opts.method == "linear" else (opts.num_features or default_num_features(d))
        n, field = b * (hq * lq + hkv * lk) * m, "num_features"
    if n > MAX_FEATURE_ELEMENTS:
        raise LimitError(
            field,
            f"method {opts.method!r} would hold {n} feature elements at once for these shapes "
            f"(limit {MAX_FEATURE_ELEMENTS}); use fewer features or shorter sequences",
        )


# ---------------------------------------------------------------------------------------------
# Implied attention maps


def bin_edges(n: int, bins: int) -> np.ndarray:
    """bins + 1 edges splitting range(n) into near-equal bins (sizes differ by at most 1)."""
    return (np.arange(bins + 1) * n) // bins


def _pool_rows(rows: np.ndarray, edges: np.ndarray, first: int) -> np.ndarray:
    """Sum consecutive rows (axis -2) into bins; `edges` are absolute, `first` is rows[0]'s."""
    return np.add.reduceat(rows, edges[:-1] - first, axis=-2)


def _feature_map(f: _Features, den: np.ndarray, pq: int, pk: int) -> np.ndarray:
    """Implied map of a feature method pooled to (pq, pk) bins of cell means: (B, Hkv, G, pq, pk).

    Never forms Lq x Lk: per key bin, sum phi(k) over the bin; a query's mass in a bin is then
    phi(q) . (bin sum). Causal rows see only part of the bin holding their last key; that part
    comes from a within-bin cumulative sum.
    """
    lq, lk = f.phiq.shape[-2], f.phik.shape[-2]
    qe, ke = bin_edges(lq, pq), bin_edges(lk, pk)
    kbin = np.add.reduceat(f.phik, ke[:-1], axis=-2)[:, :, None]  # (B, Hkv, 1, pk, F)
    partial_sums = None
    if f.last is not None and lk > pk:
        # cumulative sums restarted at each bin, in float64 to avoid cancellation
        cum = np.cumsum(f.phik, axis=-2, dtype=np.float64)
        before = np.concatenate([np.zeros_like(cum[..., :1, :]), cum[..., ke[1:-1] - 1, :]], -2)
        starts = np.repeat(np.arange(pk), np.diff(ke))
        partial_sums = (cum - before[..., starts, :]).astype(f.phik.dtype)[:, :, None]
    inv = np.where(den > 0, 1 / np.where(den > 0, den, 1), 0).astype(f.phiq.dtype)
    out = np.zeros((*f.phiq.shape[:3], pq, pk), dtype=f.phiq.dtype)
    # blocks of whole query bins, about _ROW_BLOCK rows each
    per_block = max(1, _ROW_BLOCK * pq // max(lq, 1))
    for b0 in range(0, pq, per_block):
        b1 = min(pq, b0 + per_block)
        r0, r1 = qe[b0], qe[b1]
        mass = f.phiq[..., r0:r1, :] @ kbin.swapaxes(-1, -2)  # (B, Hkv, G, n, pk)
        if f.last is not None:
            last = f.last[r0:r1]
            mass *= ke[1:] - 1 <= last[:, None]  # whole bins at or before the last key
            bin_of_last = np.searchsorted(ke, last, side="right") - 1
            partial = (last >= 0) & (ke[bin_of_last + 1] - 1 > last)
            if partial_sums is not None and partial.any():
                rows = np.nonzero(partial)[0]
                ps = partial_sums[..., last[rows], :]  # (B, Hkv, 1, n', F)
                extra = np.einsum("...nf,...nf->...n", f.phiq[..., r0 + rows, :], ps)
                mass[..., rows, bin_of_last[rows]] += extra
        mass *= inv[..., r0:r1, None]
        out[..., b0:b1, :] = _pool_rows(mass, qe[b0 : b1 + 1], r0)
    return out / (np.diff(qe)[:, None] * np.diff(ke)[None, :]).astype(out.dtype)


# ---------------------------------------------------------------------------------------------
# Methods


def _finish(num: np.ndarray, den: np.ndarray, counts: np.ndarray, empty_rows: str) -> np.ndarray:
    """num / den, with rows without allowed keys set to 0 or NaN (counts (B, Lq))."""
    empty = (counts <= 0)[:, None, None, :]  # (B, 1, 1, Lq)
    tiny = np.finfo(den.dtype).tiny  # features underflowed to 0 in a non-empty row: output 0
    out = num / np.maximum(den, tiny)[..., None]
    return np.where(empty[..., None], np.nan if empty_rows == "nan" else 0.0, out).astype(num.dtype)


def _linformer(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    pool: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Output (B, Hkv, G, Lq, Dv), the pooled implied map if `pool`, and the flops."""
    b, hq, lq, d = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    kk = opts.linformer_k or min(lk, DEFAULT_LINFORMER_K)
    e, f = (p.astype(q.dtype) for p in linformer_projections(lk, kk, opts.seed or 0))
    valid = _key_valid(b, lk, opts)
    if valid is not None:  # padded keys and values projected as zeros
        k = k * valid[..., None]
        v = v * valid[..., None]
    kp, vp = (e @ k)[:, :, None], (f @ v)[:, :, None]  # (B, Hkv, 1, kk, .)
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(d)
    s = (q.reshape(b, hkv, hq // hkv, lq, d) @ kp.swapaxes(-1, -2)) * q.dtype.type(scale)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    out = s @ vp
    flops = 2 * b * hkv * kk * lk * (d + dv) + 2 * b * hq * lq * kk * (d + dv)
    pooled = None
    if pool is not None:
        pq, pk = pool
        qe, ke = bin_edges(lq, pq), bin_edges(lk, pk)
        fb = np.broadcast_to(f, (b, 1, kk, lk)) if valid is None else f * valid[:, :, None, :]
        fbin = np.add.reduceat(fb, ke[:-1], axis=-1)[:, :, None]  # (B, 1, 1, kk, pk)
        sums = _pool_rows(s @ fbin, qe, 0)
        pooled = sums / (np.diff(qe)[:, None] * np.diff(ke)[None, :]).astype(sums.dtype)
    return out, pooled, flops


def _compute(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    pool: tuple[int, int] | None,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None, int]:
    """(output, weights, lse, pooled implied map, flops), all 4-D with Hq heads."""
    b, hq, lq, _ = q.shape
    hkv, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    counts = _row_counts(b, lq, lk, opts)
    if 0 in q.shape[:3] or lk == 0:  # nothing to attend to (or nobody asking)
        fill = np.nan if opts.empty_rows == "nan" and lk == 0 else 0.0
        out = np.full((b, hq, lq, dv), fill, dtype=q.dtype)
        weights = np.zeros((b, hq, lq, lk), q.dtype) if opts.return_weights else None
        lse = np.full((b, hq, lq), -np.inf, q.dtype) if opts.return_weights else None
        pooled = np.zeros((b, hq, *pool), q.dtype) if pool is not None else None
        return out, weights, lse, pooled, 0
    if opts.method == "linformer":
        num, pooled, flops = _linformer(q, k, v, opts, pool)
        out = _finish(num, np.ones(num.shape[:-1], num.dtype), counts, opts.empty_rows)
        grouped = (out, None, None, pooled)
    else:
        f, flops = _features(q, k, opts)
        num, den = _feature_attention(f.phiq, f.phik, v, f.last, chunk)
        nf = f.phik.shape[-1]
        flops += 2 * b * hkv * lk * nf * (dv + 1) + 2 * b * hq * lq * nf * (dv + 1)
        if f.last is not None:
            flops += 2 * b * hq * lq * min(chunk, lk) * (nf + dv + 1)
        out = _finish(num, den, counts, opts.empty_rows)
        weights = lse = None
        if opts.return_weights:
            weights = _feature_map(f, den, lq, lk)
            with np.errstate(divide="ignore"):
                lse = np.log(den) + f.log_shift
            empty = (counts <= 0)[:, None, None, :]
            lse = np.where(empty, -np.inf, lse).astype(q.dtype)
            if opts.empty_rows == "nan":
                weights[np.broadcast_to(empty, weights.shape[:-1])] = np.nan
        pooled = _feature_map(f, den, *pool) if pool is not None else None
        grouped = (out, weights, lse, pooled)
    out, weights, lse, pooled = (
        None if a is None else a.reshape(b, hq, *a.shape[3:]) for a in grouped
    )
    return out, weights, lse, pooled, flops


def _errors(approx: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(relative Frobenius error, max absolute error); rows NaN on both sides count as equal."""
    diff = approx.astype(np.float64) - exact.astype(np.float64)
    diff[np.isnan(approx) & np.isnan(exact)] = 0.0
    ref = np.nan_to_num(exact.astype(np.float64))
    norm = float(np.linalg.norm(ref))
    err = float(np.linalg.norm(diff))
    return (err / norm if norm > 0 else err), float(np.abs(diff).max(initial=0.0))


def _pool_dense(w: np.ndarray, pq: int, pk: int) -> np.ndarray:
    """(.., Lq, Lk) -> (.., pq, pk) bin means."""
    lq, lk = w.shape[-2:]
    if 0 in w.shape:
        return np.zeros((*w.shape[:-2], pq, pk), w.dtype)
    qe, ke = bin_edges(lq, pq), bin_edges(lk, pk)
    sums = np.add.reduceat(np.add.reduceat(w, ke[:-1], axis=-1), qe[:-1], axis=-2)
    return sums / (np.diff(qe)[:, None] * np.diff(ke)[None, :]).astype(sums.dtype)


def compare(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    output: np.ndarray,
    implied: np.ndarray,
    elapsed_ms: float,
) -> dict[str, Any]:
    """Run exact attention on the same input and measure the approximation against it.

    Returns {"method", "rel_error" (Frobenius, over all batches and heads), "max_abs_error",
    "rel_error_per_head" (B, Hq), "implied_map" (B, Hq, Pq, Pk) bin means of the implied
    matrix, "exact_map" (same bins; None when B*Hq*Lq*Lk > EXACT_MAP_MAX_CELLS, since it comes
    from the dense exact weights), "pooled" (bins larger than one cell), "map_kind",
    "exact_elapsed_ms", "approx_elapsed_ms"}.
    """
    from service.api import attention  # the API dispatches here, so import at call time

    b, hq, lq, _ = q.shape
    lk = k.shape[2]
    pq, pk = implied.shape[-2:]
    want_map = b * hq * lq * lk <= EXACT_MAP_MAX_CELLS
    exact = attention(
        q,
        k,
        v,
        scale=opts.scale,
        causal=opts.causal,
        key_lengths=opts.key_lengths,
        empty_rows=opts.empty_rows,
        return_weights=want_map,
    )
    rel, max_abs = _errors(output, exact.output)
    diff = np.nan_to_num(output.astype(np.float64) - exact.output)
    ref = np.linalg.norm(np.nan_to_num(exact.output.astype(np.float64)), axis=(-2, -1))
    per_head = np.linalg.norm(diff, axis=(-2, -1)) / np.where(ref > 0, ref, 1)
    return {
        "method": opts.method,
        "rel_error": rel,
        "max_abs_error": max_abs,
        "rel_error_per_head": per_head,
        "implied_map": implied,
        "exact_map": _pool_dense(exact.weights, pq, pk) if want_map else None,
        "pooled": (pq, pk) != (lq, lk),
        "map_kind": "signed operator M with output = M V (rows need not sum to 1)"
        if opts.method == "linformer"
        else "attention probabilities (rows sum to 1)",
        "exact_elapsed_ms": exact.elapsed_ms,
        "approx_elapsed_ms": elapsed_ms,
    }


def run(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    opts: AttentionOptions,
    *,
    chunk: int = CHUNK,
) -> ApproxResult:
    """Approximate attention of 4-D float arrays q (B, Hq, Lq, D), k (B, Hkv, Lk, D),
    v (B, Hkv, Lk, Dv) (already checked by the API: shapes, finiteness, key_lengths)."""
    check_options(opts)
    if opts.method == "exact":
        raise InputError("method", "run() computes the approximate methods only")
    _check_memory(q, k, opts)
    lq, lk = q.shape[2], k.shape[2]
    pool = (min(lq, MAP_SIDE), min(lk, MAP_SIDE)) if opts.compare else None
    start = time.perf_counter()
    with _serial(), np.errstate(over="ignore", under="ignore"):
        out, weights, lse, implied, flops = _compute(q, k, v, opts, pool, chunk)
    elapsed = (time.perf_counter() - start) * 1e3
    comparison = None
    if opts.compare:
        assert implied is not None
        comparison = compare(q, k, v, opts, out, implied, elapsed)
    return ApproxResult(out, weights, lse, elapsed, flops, comparison)


def attention_result(
    like: Any, q: np.ndarray, k: np.ndarray, v: np.ndarray, opts: AttentionOptions
) -> Any:
    """`run` packaged as the API's AttentionResult: q's rank (`like` is the caller's q) and type.

    The comparison's maps and per-head errors take q's leading dims too; they stay numpy.
    """
    from service.api import AttentionResult, _to_output

    res = run(q, k, v, opts)
    b, hq = q.shape[:2]
    lead = (b, hq)[4 - like.ndim :]

    def shaped(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a.reshape(lead + a.shape[2:])

    comparison = res.comparison
    if comparison is not None:
        for key in ("implied_map", "exact_map", "rel_error_per_head"):
            comparison[key] = shaped(comparison[key])
    return AttentionResult(
        output=_to_output(shaped(res.output), like),
        weights=_to_output(shaped(res.weights), like),
        lse=_to_output(shaped(res.lse), like),
        elapsed_ms=res.elapsed_ms,
        flops=res.flops,
        method=opts.method,
        comparison=comparison,
    )
