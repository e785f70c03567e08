"""What a caller passes, normalised: arrays to finite float32 (or kept in float16 / bfloat16 for the
kernel, which reads them as they are), ranks to 4-D, options to models.

Every problem is an InputError naming the argument. Arrays of other libraries (torch,
TensorFlow, JAX, anything speaking DLPack or the array protocol) are read through
service.core.frameworks, without a copy where their layout allows, and answers go back in the
library of the caller's q; no such library is imported unless the caller passed one of its arrays.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
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


def is_half(dtype: np.dtype) -> bool:
    """float16 or bfloat16 (ml_dtypes'): the 16-bit floats the kernel reads as they are."""
    return dtype == np.float16 or is_bfloat16(dtype)


def is_float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or is_bfloat16(dtype)


def to_array(name: str, x: Any) -> np.ndarray:
    """x as numpy (a view of another library's array where its layout allows: see frameworks),
    in its own dtype; bfloat16 as ml_dtypes.bfloat16 where ml_dtypes is installed."""
    try:
        return to_numpy(x)
    except ArrayError as exc:
        raise InputError(name, str(exc)) from None
    except (ValueError, TypeError) as exc:
        raise InputError(name, f"not an array: {exc}") from None


def _as_float_array(name: str, x: Any) -> np.ndarray:
    """A float array of any library as numpy, in its own dtype (bfloat16 as ml_dtypes')."""
    arr = to_array(name, x)
    if not is_float_dtype(arr.dtype):
        raise InputError(name, f"unsupported dtype {arr.dtype}; expected a floating-point array")
    return arr


# Per float dtype (by name; bfloat16's is ml_dtypes', not imported here): the unsigned view of
# its bits, the magnitude mask, and the bits of +inf.
_BITS: dict[str, tuple[type, int, int]] = {
    "float32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
    "float16": (np.uint16, 0x7FFF, 0x7C00),
    "bfloat16": (np.uint16, 0x7FFF, 0x7F80),
}


_BLOCK = 1 << 18  # elements per pass of _magnitude (1 MiB of float32)


def _magnitude(arr: np.ndarray) -> float:
    """max |arr| (NaN when arr holds NaN, inf when it holds inf; 0 when empty) in one integer
    pass over the bits: for IEEE-style floats the magnitude bits order like the magnitudes. ~10x
    cheaper than isfinite + min + max, and numpy's float16 / bfloat16 reductions are slow."""
    if arr.size == 0:
        return 0.0
    bits = _BITS.get(arr.dtype.name)
    if bits is None or not arr.flags.c_contiguous:
        with np.errstate(invalid="ignore"):
            return float(np.max(np.abs(arr.astype(np.float64, copy=False))))
    utype, mask, inf = bits
    # Block by block through one cache-sized buffer: a whole-array temporary costs more in page
    # faults than the pass itself (13 ms against 5 ms for 16M float32).
    flat: np.ndarray = arr.reshape(-1).view(utype)
    buf: np.ndarray = np.empty(min(flat.size, _BLOCK), dtype=utype)
    top = 0
    for start in range(0, flat.size, _BLOCK):
        part = flat[start : start + _BLOCK]
        out = buf[: part.size]
        np.bitwise_and(part, utype(mask), out=out)
        top = max(top, int(out.max()))
    if top > inf:
        return math.nan
    return float(np.array([top], dtype=utype).view(arr.dtype)[0])


def _finite(name: str, arr: np.ndarray) -> tuple[np.ndarray, float]:
    """arr and its max|x|, after refusing NaN and Inf; the magnitude rules (magnitudes.py) reuse
    the max, so that each input is read once per call."""
    peak = _magnitude(arr)
    if not math.isfinite(peak):
        raise InputError(name, f"contains NaN or Inf (as {arr.dtype})")
    return arr, peak


def checked_float32(name: str, x: Any) -> tuple[np.ndarray, float]:
    """A C-contiguous, finite float32 view (or copy, when the dtype or strides require one) of a
    floating-point array of any library, and its max|x|."""
    arr = _as_float_array(name, x)
    with np.errstate(over="ignore"):  # float64 beyond float32's range is reported below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    return _finite(name, arr)


def kernel_inputs(names: tuple[str, ...], xs: tuple[Any, ...]) -> list[tuple[np.ndarray, float]]:
    """Arrays the attention kernel reads, each with its max|x|: C-contiguous and finite, kept in
    float16 or bfloat16 when all of them have that dtype (the kernel reads 16-bit floats as they
    are), else float32. Each max is that of the array returned, after any conversion."""
    arrays = [_as_float_array(name, x) for name, x in zip(names, xs, strict=True)]
    dtype = arrays[0].dtype
    if is_half(dtype) and all(a.dtype == dtype for a in arrays):
        return [_finite(n, np.ascontiguousarray(a)) for n, a in zip(names, arrays, strict=True)]
    return [checked_float32(name, a) for name, a in zip(names, arrays, strict=True)]


@dataclass(frozen=True)
class Peaks:
    """max|q|, max|k|, max|v| of the arrays the kernel reads (0 for empty ones): the bounds the
    magnitude rules need, found by the finiteness check rather than by scanning again."""

    q: float
    k: float
    v: float

    @classmethod
    def of(cls, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> Peaks:
        """Measured: for finite arrays that did not come through the checks here."""
        return cls(absmax(q), absmax(k), absmax(v))


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
    """max |a| of a finite array (0 for None or empty)."""
    return 0.0 if a is None else _magnitude(a)


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


def qkv_4d(
    q: Any, k: Any, v: Any, *, keep_half: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, Peaks]:
    """q, k, v as checked 4-D arrays (B, H, L, D), the rank the caller used and their max|x|:
    float32, or with keep_half float16 / bfloat16 when all three have that dtype."""
    names = ("q", "k", "v")
    if keep_half:
        checked = kernel_inputs(names, (q, k, v))
    else:
        checked = [checked_float32(name, x) for name, x in zip(names, (q, k, v), strict=True)]
    arrays = [a for a, _ in checked]
    q4, k4, v4 = as_4d(*arrays)  # views: the same values, so the same peaks
    return q4, k4, v4, arrays[0].ndim, Peaks(*(peak for _, peak in checked))


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
