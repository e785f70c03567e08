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

BLAS runs on one thread here (see methods._serial), so `num_threads` of the API does not apply.

By job: supported.py (the options each method accepts), features.py (feature maps and the random
matrices), products.py (feature attention, causal chunks), pooling.py (implied maps in bins),
compare.py (against exact attention), methods.py (`run`: sizes, methods, timing).
"""

from service.core.approx.features import (
    default_num_features,
    linformer_projections,
    performer_features,
)
from service.core.approx.methods import (
    CHUNK,
    DEFAULT_LINFORMER_K,
    MAP_SIDE,
    MAX_FEATURE_ELEMENTS,
    ApproxResult,
    run,
)
from service.core.approx.pooling import bin_edges
from service.core.approx.supported import SUPPORTED, Method, check_options

__all__ = [
    "CHUNK",
    "DEFAULT_LINFORMER_K",
    "MAP_SIDE",
    "MAX_FEATURE_ELEMENTS",
    "SUPPORTED",
    "ApproxResult",
    "Method",
    "bin_edges",
    "check_options",
    "default_num_features",
    "linformer_projections",
    "performer_features",
    "run",
]
