"""What a caller passes, normalised: arrays to finite float32, ranks to 4-D, options to models.

Every problem is an InputError naming the argument. Arrays of other libraries (torch,
TensorFlow, JAX, anything speaking DLPack or the array protocol) are read through
service.core.frameworks, without a copy where their layout allows, and answers go back in the
library of the caller's q; no such library is imported unless the caller passed one of its arrays.
"""

from __future__ import annotations

import operator
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from service.core.errors import InputError
from service.core.frameworks import ArrayError, from_numpy, is_bfloat16, to_numpy
from service.core.options import (
    AttentionOptions,
    BlockMask,
    BlockPattern,
    MultiheadOptions,
    MultiheadWeights,
    Window,
)

# A numpy array or another library's array (none is a dependency, so no stricter annotation).
ArrayLike = Any

ModelT = TypeVar("ModelT", bound=BaseModel)

MAX_THREADS = 1024
# Bound on |scores| (and projections) that the float32 kernel can form without overflowing to
# inf, where inf - inf would give NaN; a little headroom below float32's max of 3.4e38.
F32_SAFE = 1e37

# pydantic puts union tags ("bool", "list[float]", "literal[...]") into error locations; these
# are dropped so that a loc names fields only.
_TYPE_TAGS = frozenset({"bool", "int", "float", "str", "none"})
_FIELD_NAMES = frozenset(
    set(MultiheadOptions.model_fields)
    | set(AttentionOptions.model_fields)
    | set(Window.model_fields)
    | set(MultiheadWeights.model_fields)
    | set(BlockMask.model_fields)
    | set(BlockPattern.model_fields)
)


# ---------------------------------------------------------------------------------------------
# Arrays


def to_array(name: str, x: Any) -> np.ndarray:
    """x as numpy (a view of another library's array where its layout allows: see frameworks),
    in its own dtype; bfloat16 as ml_dtypes.bfloat16 where ml_dtypes is installed."""
    try:
        return to_numpy(x)
    except ArrayError as exc:
        raise InputError(name, str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise InputError(name, f"not an array: {exc}") from None


def as_float32(name: str, x: Any) -> np.ndarray:
    """A C-contiguous, finite float32 view (or copy, when the dtype or strides require one) of a
    floating-point array of any library."""
    arr = to_array(name, x)
    if arr.dtype.kind != "f" and not is_bfloat16(arr.dtype):
        raise InputError(name, f"unsupported dtype {arr.dtype}; expected a floating-point array")
    with np.errstate(over="ignore"):  # float64 beyond float32's range is reported below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(name, "contains NaN or Inf (after conversion to float32)")
    return arr


def to_output(arr: np.ndarray | None, like: Any) -> ArrayLike | None:
    """Answer in the library of `like` (the caller's q), on the CPU, or as numpy."""
    return None if arr is None else from_numpy(arr, like)


def thread_count(num_threads: int | None) -> int:
    """Native thread count: 0 means the library default."""
    if num_threads is None:
        return 0
    try:
        n = operator.index(num_threads)
    except TypeError:
        raise InputError(
            "num_threads", f"must be an integer or None, got {num_threads!r}"
        ) from None
    if isinstance(num_threads, bool) or not 1 <= n <= MAX_THREADS:
        raise InputError("num_threads", f"must be between 1 and {MAX_THREADS}, got {num_threads!r}")
    return n


def absmax(a: np.ndarray | None) -> float:
    """max |a| without a temporary array (0 for None or empty)."""
    return 0.0 if a is None or a.size == 0 else float(max(-a.min(), a.max()))


def check_magnitude(loc: str | tuple[str | int, ...], bound: float, what: str) -> None:
    if not bound <= F32_SAFE:
        raise InputError(
            loc, f"values too large: {what} could reach {bound:.3g}, beyond float32's range"
        )


def as_4d(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """(Lq, D) / (Hq, Lq, D) / (B, Hq, Lq, D) -> 4-D views, with every shape rule checked."""
    if q.ndim not in (2, 3, 4):
        raise InputError(
            "q", f"expected (Lq, D), (Hq, Lq, D) or (B, Hq, Lq, D); got {q.ndim} dimensions"
        )
    for name, a in (("k", k), ("v", v)):
        if a.ndim != q.ndim:
            raise InputError(name, f"has {a.ndim} dimensions but q has {q.ndim}; use one rank")
    pad = (1,) * (4 - q.ndim)
    q4, k4, v4 = (np.reshape(a, pad + a.shape) for a in (q, k, v))
    b, hq, _, d = q4.shape
    bk, hkv, lk, dk = k4.shape
    bv, hv, lv, dv = v4.shape
    if d == 0:
        raise InputError("q", "head dim D is 0 (empty tensor)")
    if dk != d:
        raise InputError("k", f"head dim {dk} differs from q's {d}")
    if dv == 0:
        raise InputError("v", "value dim Dv is 0 (empty tensor)")
    if bk != b or bv != b:
        raise InputError("k" if bk != b else "v", f"batch {bk if bk != b else bv} != q's {b}")
    if hv != hkv:
        raise InputError("v", f"has {hv} heads but k has {hkv}")
    if lv != lk:
        raise InputError("v", f"has {lv} keys but k has {lk}")
    if (hkv == 0 and hq != 0) or (hkv and hq % hkv):
        raise InputError("k", f"q's {hq} heads are not a multiple of k's {hkv} heads")
    return q4, k4, v4


def qkv_4d(q: Any, k: Any, v: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """q, k, v as checked float32 4-D arrays (B, H, L, D), and the rank the caller used."""
    arrays = [as_float32(name, x) for name, x in (("q", q), ("k", k), ("v", v))]
    q4, k4, v4 = as_4d(*arrays)
    return q4, k4, v4, arrays[0].ndim


def caller_rank(a: np.ndarray, rank: int) -> np.ndarray:
    """A result (B, Hq, ...) reshaped to the caller's rank: (B, Hq, ...), (Hq, ...) or (...)."""
    return a.reshape(a.shape[:2][4 - rank :] + a.shape[2:])


# ---------------------------------------------------------------------------------------------
# Options


def input_error(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> InputError:
    """The first pydantic error as an InputError; union tags are dropped from its loc."""
    errors = exc.errors(include_url=False)

    def is_tag(part: str | int) -> bool:
        return (
            isinstance(part, str)
            and part not in _FIELD_NAMES
            and ("[" in part or part in _TYPE_TAGS)
        )

    def clean(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
        return tuple(p for i, p in enumerate(loc) if i == 0 or not is_tag(p))

    loc = clean(errors[0]["loc"])
    msgs = dict.fromkeys(e["msg"] for e in errors if clean(e["loc"]) == loc)
    return InputError(prefix + loc or ("options",), "; ".join(msgs))


def parse_options(
    model: type[ModelT], options: BaseModel | dict[str, Any] | None, overrides: dict[str, Any]
) -> ModelT:
    """Validate `options` with keyword overrides on top; only `model`'s own fields are taken."""
    if options is None:
        base: dict[str, Any] = {}
    elif isinstance(options, BaseModel):
        base = {f: getattr(options, f) for f in options.model_fields_set if f in model.model_fields}
    elif isinstance(options, dict):
        base = dict(options)
    else:
        raise InputError("options", f"expected {model.__name__} or a dict, got {type(options)}")
    data = {**base, **overrides}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise input_error(exc) from None
