"""Arrays of other libraries as numpy arrays, and results back in the caller's library.

One rule for every library (torch, TensorFlow, JAX, and anything else that speaks DLPack or the
array protocol), which is known by the top-level module of the array's type: nothing here
imports a library unless the caller passed one of its arrays (it is loaded by then).

- In (`to_numpy`): DLPack (`np.from_dlpack`), a view of the library's CPU buffer with its own
  strides and dtype, never a copy (a tf.Variable's current value is read first); the array
  protocol (`__array__`, `__array_interface__`) for objects without DLPack (pandas, ...) or
  whose DLPack export fails; never Python lists. bfloat16, which numpy lacks, arrives as
  ml_dtypes.bfloat16 (a view; ml_dtypes comes with JAX and TensorFlow) or, where ml_dtypes is
  not installed, widened to float32 exactly. Arrays on a GPU or another accelerator are
  refused: the service computes on the CPU and copies nothing off a device behind the caller's
  back.
- Out (`from_numpy`): the library's own from_dlpack (torch, TensorFlow, or the Array API
  namespace that JAX and others expose), which takes numpy's buffer without a copy where the
  library allows it: torch always; TensorFlow and JAX need 64-byte aligned buffers, and
  numpy's are 16-byte aligned, so those mostly get one copy. JAX without x64 makes int64
  (top-k indices) int32, as it does with every array.

numpy only: the HTTP client reads arrays through service.core.tensor_codec, which uses this.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np


class ArrayError(ValueError):
    """An array that cannot be read on the CPU; the message says why and what to do."""


# DLPack device types whose memory the CPU reads directly (numpy's from_dlpack accepts these):
# kDLCPU, kDLCUDAHost (pinned), kDLROCMHost, kDLCUDAManaged.
_HOST_DEVICES = frozenset({1, 3, 11, 13})
_DEVICE_NAMES = {
    2: "CUDA",
    4: "OpenCL",
    7: "Vulkan",
    8: "Metal",
    9: "VPI",
    10: "ROCm",
    12: "extension",
    14: "oneAPI",
    15: "WebGPU",
    16: "Hexagon",
    17: "MAIA",
}
_MOVE_TO_CPU = (
    "the service computes on the CPU: move it there first (torch: x.cpu(); "
    "JAX: jax.device_put(x, jax.devices('cpu')[0]); TensorFlow: tf.identity(x) under "
    "tf.device('/CPU:0'))"
)


def library(x: Any) -> str:
    """The top-level module of x's type: "numpy", "torch", "tensorflow", "jaxlib", ..."""
    return type(x).__module__.split(".", 1)[0]


def is_array(x: Any) -> bool:
    """An array of some library other than numpy (an object speaking DLPack or the array
    protocol); numpy arrays and scalars, lists and plain numbers are not."""
    if isinstance(x, np.ndarray | np.generic):
        return False
    return any(
        hasattr(x, attr)
        for attr in ("__dlpack__", "__array__", "__array_interface__", "__array_struct__")
    )


def is_bfloat16(dtype: Any) -> bool:
    """Whether a dtype (numpy's, or any library's) is bfloat16."""
    return "bfloat16" in str(dtype)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _module(name: str) -> Any:
    # Only ever called for the library of an array the caller passed: it is already loaded.
    return importlib.import_module(name)


def _torch_exportable(t: Any) -> Any:
    """What torch's DLPack export refuses, resolved: autograd, lazy conjugation and negation."""
    return t.detach().resolve_conj().resolve_neg()


def _tensorflow_exportable(t: Any) -> Any:
    """tf.Variable has no DLPack; its current value, a tensor on the variable's device, has.
    TensorFlow aborts the process when asked to export strings (or quantized, resource or
    variant tensors) through DLPack: those are refused first."""
    if not hasattr(t, "__dlpack__"):
        t = _module("tensorflow").convert_to_tensor(t)
    dtype = t.dtype
    if dtype.is_quantized or not (
        dtype.is_floating or dtype.is_integer or dtype.is_bool or dtype.is_complex
    ):
        raise ArrayError(f"unsupported dtype {dtype.name}: only numbers and bools can be read")
    return t


# What a library's arrays need before DLPack takes them (the rest of the rule is the same).
_EXPORTABLE: dict[str, Callable[[Any], Any]] = {
    "torch": _torch_exportable,
    "tensorflow": _tensorflow_exportable,
}


def _check_device(x: Any) -> None:
    device = getattr(x, "__dlpack_device__", None)
    if device is None:
        return
    try:
        kind, index = device()
    except Exception as exc:  # e.g. torch's "meta" tensors have no device to read from
        raise ArrayError(f"cannot read this {library(x)} array: {exc}") from None
    kind = int(kind)
    if kind not in _HOST_DEVICES:
        where = _DEVICE_NAMES.get(kind, f"DLPack device type {kind}")
        raise ArrayError(f"is on a {where} device (device {int(index)}); {_MOVE_TO_CPU}")


def _bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """16-bit patterns as ml_dtypes.bfloat16 (a view), or as float32 without ml_dtypes."""
    try:
        import ml_dtypes
    except ImportError:
        return bfloat16_bits_to_float32(bits)
    return bits.view(ml_dtypes.bfloat16)


def _bfloat16(x: Any) -> np.ndarray:
    if library(x) == "torch":  # torch exports no bfloat16: its bits, through DLPack
        return _bfloat16_bits(np.from_dlpack(x.view(_module("torch").int16)).view(np.uint16))
    arr = np.asarray(x)  # JAX and TensorFlow give ml_dtypes.bfloat16 views
    if not is_bfloat16(arr.dtype):
        raise ArrayError(f"cannot read this {library(x)} bfloat16 array (numpy made {arr.dtype})")
    return arr


def to_numpy(x: Any) -> np.ndarray:
    """x as a numpy array: numpy arrays as they are, other libraries' arrays through DLPack
    (a view, zero-copy; strides and dtype kept), anything else through np.asarray.

    Raises ArrayError for an array on an accelerator or one that cannot be exported, and lets
    np.asarray's ValueError/TypeError through for what is not an array at all.
    """
    if isinstance(x, np.ndarray):
        return x
    if not is_array(x):
        return np.asarray(x)
    lib = library(x)
    try:
        x = _EXPORTABLE.get(lib, lambda a: a)(x)
        _check_device(x)
        if is_bfloat16(getattr(x, "dtype", None)):
            return _bfloat16(x)
        if hasattr(x, "__dlpack__"):
            try:
                return np.from_dlpack(x)
            except Exception:  # e.g. a dtype DLPack lacks (strings): the array protocol may say
                if not hasattr(x, "__array__"):
                    raise
        return np.asarray(x)  # the array protocol, for what DLPack does not carry
    except ArrayError:
        raise
    except Exception as exc:  # each library fails in its own way (sparse, tracers, ...)
        raise ArrayError(f"cannot read this {lib} array: {exc}") from None


def aligned(arr: np.ndarray, alignment: int = 64) -> np.ndarray:
    """arr, or a C-contiguous copy of it starting on an `alignment`-byte boundary."""
    if arr.flags.c_contiguous and arr.ctypes.data % alignment == 0:
        return arr
    buf = np.empty(arr.nbytes + alignment, np.uint8)
    start = -buf.ctypes.data % alignment
    out = buf[start : start + arr.nbytes].view(arr.dtype).reshape(arr.shape)
    out[...] = arr
    return out


def _tensorflow_from_dlpack(arr: np.ndarray) -> Any:
    # TensorFlow takes any pointer through DLPack, then aborts the process in a kernel that
    # checks the 64-byte alignment of its inputs; numpy allocates at 16 bytes.
    return _module("tensorflow").experimental.dlpack.from_dlpack(aligned(arr).__dlpack__())


def _torch_from_dlpack(arr: np.ndarray) -> Any:
    return _module("torch").from_dlpack(arr)


# Libraries whose arrays have no Array API namespace to ask for from_dlpack.
_FROM_DLPACK: dict[str, Callable[[np.ndarray], Any]] = {
    "torch": _torch_from_dlpack,
    "tensorflow": _tensorflow_from_dlpack,
}


def from_numpy(arr: np.ndarray, like: Any) -> Any:
    """arr in the library of `like` (on the CPU), or arr itself when `like` is numpy, a list or
    an array of a library that offers no way back (no from_dlpack)."""
    if not is_array(like):
        return arr
    arr = np.ascontiguousarray(arr)  # some libraries take only C order through DLPack
    make = _FROM_DLPACK.get(library(like))
    if make is None:
        namespace = getattr(like, "__array_namespace__", None)
        if namespace is None:
            return arr
        make = namespace().from_dlpack
    return make(arr)
