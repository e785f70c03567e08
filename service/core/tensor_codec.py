"""Tensor decoding and encoding: numpy arrays in and out of JSON-friendly forms.

numpy and base64 only, so that the HTTP client (service.client) can use it without the server's
dependencies or the compiled extension. A tensor arrives as one of:
- a nested list of numbers (or booleans);
- {"dtype", "shape", "data": [flat numbers]};
- {"dtype", "shape", "b64": base64 of the little-endian C-order bytes};
- (Python API only) a numpy array, or an array of another library (torch, TensorFlow, JAX, ...:
  service.core.frameworks reads it, bfloat16 becoming float32 here).

Everything is parsed by numpy in bulk, never element by element.
"""

from __future__ import annotations

import binascii
import math
from typing import Any, Literal

import numpy as np

from service.core.frameworks import (
    ArrayError,
    bfloat16_bits_to_float32,
    is_array,
    is_bfloat16,
    to_numpy,
)

try:
    # SIMD base64, ~30x faster than the standard library on large tensors; a server dependency.
    import pybase64 as base64
except ImportError:  # a thin client installed with numpy and httpx only
    import base64  # type: ignore[no-redef]

DTypeName = Literal["float32", "float64", "float16", "bfloat16", "bool", "int32", "int64"]
Encoding = Literal["list", "b64"]

# Little-endian wire dtypes; bfloat16 travels as its raw 16 bits.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "bool": np.dtype("?"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}

# No real tensor has more dimensions; the bound stops absurd shapes early.
MAX_NDIM = 8


class TensorError(ValueError):
    """A tensor could not be decoded; the message says why."""


class TensorLimitError(TensorError):
    """A tensor is larger than the configured element limit (HTTP answers 413)."""


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, int) and not isinstance(s, bool) for s in shape
    ):
        raise TensorError("'shape' must be a list of integers")
    if len(shape) > MAX_NDIM:
        raise TensorError(f"'shape' has {len(shape)} dimensions; at most {MAX_NDIM} are allowed")
    if any(s < 0 for s in shape):
        raise TensorError(f"'shape' {list(shape)} has a negative dimension")
    return tuple(shape)


def _num_elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _decode_object(obj: dict[str, Any], max_elements: int | None) -> np.ndarray:
    unknown = set(obj) - {"dtype", "shape", "data", "b64"}
    if unknown:
        raise TensorError(
            f"unknown tensor keys {sorted(unknown)}; expected dtype, shape, data or b64"
        )
    dtype_name = obj.get("dtype", "float32")
    # A list or object here is unhashable: test the type before the lookup.
    if not isinstance(dtype_name, str) or dtype_name not in WIRE_DTYPES:
        raise TensorError(f"unknown dtype {dtype_name!r}; expected one of {', '.join(WIRE_DTYPES)}")
    if "shape" not in obj:
        raise TensorError("a tensor object needs 'shape'")
    shape = _check_shape(obj["shape"])
    n = _num_elements(shape)
    if max_elements is not None and n > max_elements:
        raise TensorLimitError(f"shape {list(shape)} has {n} elements; the limit is {max_elements}")
    has_data, has_b64 = "data" in obj, "b64" in obj
    if has_data == has_b64:
        raise TensorError("a tensor object needs exactly one of 'data' or 'b64'")
    wire = WIRE_DTYPES[dtype_name]
    if has_b64:
        if not isinstance(obj["b64"], str):
            raise TensorError("'b64' must be a base64 string")
        try:
            raw = base64.b64decode(obj["b64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise TensorError(f"'b64' is not valid base64: {exc}") from None
        if len(raw) != n * wire.itemsize:
            raise TensorError(
                f"'b64' holds {len(raw)} bytes but shape {list(shape)} of {dtype_name} "
                f"needs {n * wire.itemsize}"
            )
        arr = np.frombuffer(raw, dtype=wire).reshape(shape)
    else:
        data = obj["data"]
        if not isinstance(data, list):
            raise TensorError("'data' must be a flat list of numbers")
        if len(data) != n:
            raise TensorError(f"'data' has {len(data)} values but shape {list(shape)} needs {n}")
        flat = _array_from_list(data)
        if flat.ndim != 1:
            raise TensorError("'data' must be a flat list of numbers")
        if dtype_name == "bfloat16":
            arr = flat.astype(np.float32).reshape(shape)
            return arr
        arr = _cast_checked(flat, wire).reshape(shape)
    if dtype_name == "bfloat16":
        return bfloat16_bits_to_float32(arr)
    return arr.astype(wire.newbyteorder("="), copy=False)


def _first_leaf(data: list[Any]) -> Any:
    leaf: Any = data
    while isinstance(leaf, list) and leaf:
        leaf = leaf[0]
    return leaf


def _array_from_list(data: list[Any]) -> np.ndarray:
    # Floats are the common case: naming the dtype skips numpy's type discovery (~1.5x faster).
    # A mixed or ragged list fails here and takes the general path, which explains the problem.
    if type(_first_leaf(data)) is float:
        try:
            return np.array(data, dtype=np.float64)
        except (ValueError, TypeError):
            pass
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise TensorError("nested lists are ragged: every row must have the same length") from None
    if arr.dtype == object:
        raise TensorError("nested lists are ragged or hold non-numbers")
    if arr.dtype.kind not in "biuf":
        raise TensorError(f"expected numbers, found values of type {arr.dtype.kind!r} (strings?)")
    return arr


def _cast_checked(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "b" and arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
        raise TensorError("a bool tensor holds only true/false (or 0/1)")
    if (
        dtype.kind in "iu"
        and arr.dtype.kind == "f"
        and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)))
    ):
        raise TensorError(f"a {dtype.name} tensor holds only whole numbers")
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise TensorError(f"values outside the range of {dtype.name}")
    return arr.astype(dtype)


def decode_tensor(value: Any, max_elements: int | None = None) -> np.ndarray:
    """Turn any accepted tensor form into a numpy array (native byte order); bfloat16 arrays
    (ml_dtypes') become float32, exactly."""
    if isinstance(value, np.ndarray):
        arr = value
    elif is_array(value):
        try:
            arr = to_numpy(value)
        except ArrayError as exc:
            raise TensorError(str(exc)) from None
    elif isinstance(value, dict):
        return _decode_object(value, max_elements)
    elif isinstance(value, (list, tuple)):
        arr = _array_from_list(list(value))
    elif isinstance(value, (int, float, bool)):
        arr = np.asarray(value)
    else:
        raise TensorError(
            "expected a nested list of numbers or an object with dtype, shape and data or b64"
        )
    if max_elements is not None and arr.size > max_elements:
        raise TensorLimitError(f"tensor has {arr.size} elements; the limit is {max_elements}")
    if is_bfloat16(arr.dtype):
        arr = arr.astype(np.float32)
    if arr.dtype.kind not in "biuf":
        raise TensorError(f"unsupported dtype {arr.dtype}")
    return arr


def encode_tensor(arr: np.ndarray, encoding: Encoding = "list") -> Any:
    """Encode an array for a JSON response: nested lists, or {dtype, shape, b64}."""
    if encoding == "b64":
        wire = WIRE_DTYPES.get(arr.dtype.name)
        if wire is None:
            raise TensorError(f"cannot encode dtype {arr.dtype}")
        data = np.ascontiguousarray(arr, dtype=wire)
        return {
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
            "b64": base64.b64encode(data.data).decode("ascii"),
        }
    return arr.tolist()


def encoding_of(value: Any) -> Encoding:
    """The encoding a request used for a tensor, so responses can answer in kind."""
    return "b64" if isinstance(value, dict) and "b64" in value else "list"
