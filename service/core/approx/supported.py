"""Which options each approximation accepts, and the error naming the method and the option."""

from __future__ import annotations

from typing import Literal

from service.core.errors import InputError
from service.core.options import AttentionOptions

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
            "block_mask",
            "cu_seqlens",
            "cu_seqlens_q",
            "cu_seqlens_k",
            "weights_rows",
            "memory",
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
    "block_mask": "a block-sparse layout is per-(query, key) masking; use method 'exact'",
    "cu_seqlens": "packed documents need per-(query, key) masking; use method 'exact'",
    "cu_seqlens_q": "packed documents need per-(query, key) masking; use method 'exact'",
    "cu_seqlens_k": "packed documents need per-(query, key) masking; use method 'exact'",
    "weights_rows": "it forms no weights of its own; compare returns its implied map",
    "memory": "recurrent memory is a pattern of exact attention; use method 'exact'",
}


def check_options(opts: AttentionOptions) -> None:
    """InputError naming the method and the option when the combination is not supported."""
    supported = SUPPORTED[opts.method]
    for name, loc in opts.active_options().items():
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
