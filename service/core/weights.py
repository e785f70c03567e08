"""Multi-head projection weights: head layout, Xavier-uniform init, and shape checks."""

from __future__ import annotations

import math

import numpy as np

from service.core.errors import InputError
from service.core.inputs import is_float_dtype
from service.core.options import MultiheadWeights

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")
_BIASES = ("q_bias", "k_bias", "v_bias", "out_bias")


def head_layout(embed_dim: int, num_heads: int, num_kv_heads: int | None) -> tuple[int, int]:
    """(num_kv_heads, head_dim) after checking that the heads divide as they must."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise InputError("num_heads", f"must be an integer >= 1, got {num_heads!r}")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise InputError("num_kv_heads", f"must be an integer >= 1, got {num_kv_heads!r}")
    if embed_dim < 1:
        raise InputError("embed_dim", f"must be >= 1, got {embed_dim}")
    if embed_dim % num_heads:
        raise InputError(
            "num_heads", f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}"
        )
    if num_heads % num_kv_heads:
        raise InputError(
            "num_kv_heads",
            f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}",
        )
    return num_kv_heads, embed_dim // num_heads


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError("seed", f"must be an integer >= 0, got {seed!r}")


def expected_shapes(
    embed_dim: int, kv_dim: int, kdim: int, vdim: int
) -> dict[str, tuple[int, ...]]:
    """Shape of every weight and bias, torch's (out_features, in_features) layout."""
    return {
        "q_proj": (embed_dim, embed_dim),
        "k_proj": (kv_dim, kdim),
        "v_proj": (kv_dim, vdim),
        "out_proj": (embed_dim, embed_dim),
        "q_bias": (embed_dim,),
        "k_bias": (kv_dim,),
        "v_bias": (kv_dim,),
        "out_bias": (embed_dim,),
    }


def init_multihead_weights(
    embed_dim: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    kdim: int | None = None,
    vdim: int | None = None,
    seed: int = 0,
) -> MultiheadWeights:
    """Xavier-uniform projections (each matrix on its own fans) and zero biases, from `seed`.

    Reproducible: the same arguments give the same weights (numpy's PCG64 generator).
    """
    num_kv_heads, head_dim = head_layout(embed_dim, num_heads, num_kv_heads)
    kdim = embed_dim if kdim is None else kdim
    vdim = embed_dim if vdim is None else vdim
    for name, dim in (("kdim", kdim), ("vdim", vdim)):
        if dim < 1:
            raise InputError(name, f"must be >= 1, got {dim}")
    check_seed(seed)
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(embed_dim, num_kv_heads * head_dim, kdim, vdim)
    arrays: dict[str, np.ndarray] = {}
    for name in _PROJECTIONS:
        fan_out, fan_in = shapes[name]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        arrays[name] = rng.uniform(-bound, bound, size=(fan_out, fan_in)).astype(np.float32)
    for name in _BIASES:
        arrays[name] = np.zeros(shapes[name], dtype=np.float32)
    return MultiheadWeights(**arrays)


def checked_arrays(
    weights: MultiheadWeights, embed_dim: int, kv_dim: int, kdim: int, vdim: int
) -> dict[str, np.ndarray | None]:
    """The weights as C-contiguous float32 arrays, each checked for shape, dtype and finiteness."""
    shapes = expected_shapes(embed_dim, kv_dim, kdim, vdim)
    out: dict[str, np.ndarray | None] = {}
    for name in _PROJECTIONS + _BIASES:
        arr = getattr(weights, name)
        if arr is None:
            out[name] = None
            continue
        loc = ("weights", name)
        if not is_float_dtype(arr.dtype):
            raise InputError(loc, f"expected a floating-point tensor, got dtype {arr.dtype}")
        if arr.shape != shapes[name]:
            raise InputError(
                loc, f"shape {tuple(arr.shape)} does not match the expected {shapes[name]}"
            )
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InputError(loc, "contains NaN or Inf")
        out[name] = arr
    return out


def parameter_count(arrays: dict[str, np.ndarray | None]) -> int:
    """Elements in every weight and bias used (torch counts in_proj + out_proj the same way)."""
    return sum(int(a.size) for a in arrays.values() if a is not None)
