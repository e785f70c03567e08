"""JSON bodies in and out: parsing, model validation with the limits, tensor encoding.

Speed matters here (a 3 x 128 x 64 request must not cost tens of milliseconds). Tensors sent as
nested lists of floats are read straight into numpy by simdjson (`bulk tensors` below) without
one Python float per number; everything else is parsed by orjson, and the Tensor type turns the
remaining tensors into numpy in bulk. orjson writes numpy arrays directly (OPT_SERIALIZE_NUMPY)
instead of going through Python lists or FastAPI's jsonable_encoder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from functools import cache
from typing import Any, TypeVar, get_args

import numpy as np
import orjson
import simdjson
from pydantic import BaseModel
from starlette.responses import Response

from service.core.frameworks import is_bfloat16
from service.core.tensor_codec import MAX_NDIM, Encoding, encode_tensor
from service.core.tensor_field import Tensor
from service.web.problems import MalformedBody

ModelT = TypeVar("ModelT", bound=BaseModel)

_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def parse_json(body: bytes, tensors: Collection[str] = ()) -> Any:
    """The body as JSON; MalformedBody (400) if it is not JSON at all.

    Top-level fields named in `tensors` that hold rectangular nested lists of floats come back
    as float64 numpy arrays (what the Tensor type would make of them), read in bulk.
    """
    if tensors:
        fast = _parse_bulk_tensors(body, frozenset(tensors))
        if fast is not None:
            return fast
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson rejects NaN, Infinity and 1e400; the standard parser accepts them, so the
        # request reaches validation, which names the field that holds them (422).
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise MalformedBody(f"the body is not valid JSON: {exc}") from None


# Bulk tensors. A 128 x 64 float tensor as JSON is 8192 numbers: orjson makes a Python float of
# each and numpy reads them back one by one, which costs several times the parse itself.
# simdjson parses into its own tape and copies a homogeneous array's numbers into one buffer.
# The fast path is taken only when it provably gives what the general path gives; anything
# else (other JSON, ints first, bools, nulls, ragged or empty lists, duplicate keys, NaN, ...)
# returns None and the body is parsed again the general way, so errors read the same.
_OPEN = ord("[")


def _bulk_floats(value: simdjson.Array) -> tuple[np.ndarray, int] | None:
    """(float64 array, number of JSON arrays it was written with), or None if not rectangular.

    The shape comes from the first element at each depth; every array above the last level is
    checked to hold arrays of that length. Leaves that are not numbers make as_buffer fail;
    leaves that are arrays are caught by the caller's count of "[" in the whole body.
    """
    shape: list[int] = []
    node: Any = value
    while type(node) is simdjson.Array:
        n = len(node)
        if n == 0 or len(shape) == MAX_NDIM:  # the general path explains those
            return None
        shape.append(n)
        node = node[0]
    # As the general path: a float first means float data (ints in it are converted too).
    if type(node) is not float:
        return None
    level: list[Any] = [value]
    for want in shape[1:]:
        level = [child for array in level for child in array]
        if any(type(child) is not simdjson.Array or len(child) != want for child in level):
            return None
    try:
        flat = np.frombuffer(value.as_buffer(of_type="d"), dtype=np.float64)
    except (ValueError, TypeError, RuntimeError):  # a leaf is not a number
        return None
    if flat.size != math.prod(shape):
        return None
    arrays = 1 + sum(math.prod(shape[:i]) for i in range(1, len(shape)))
    return flat.reshape(shape), arrays


def _arrays_in(value: Any) -> int | None:
    """Number of JSON arrays in a parsed value; None if a string or key holds "["."""
    if isinstance(value, list):
        total = 1
        for item in value:
            n = _arrays_in(item)
            if n is None:
                return None
            total += n
        return total
    if isinstance(value, dict):
        total = 0
        for key, item in value.items():
            n = _arrays_in(item)
            if n is None or "[" in key:
                return None
            total += n
        return total
    if isinstance(value, str) and "[" in value:
        return None
    return 0


def _plain(value: Any) -> Any:
    if type(value) is simdjson.Object:
        return value.as_dict()
    if type(value) is simdjson.Array:
        return value.as_list()
    return value


def _parse_bulk_tensors(body: bytes, tensors: frozenset[str]) -> dict[str, Any] | None:
    try:
        # A fresh parser per body costs no more than re-using one, and no proxy into an old
        # document can outlive it.
        doc = simdjson.Parser().parse(body)
    except Exception:  # not JSON simdjson accepts (NaN, 1e400, ...): the general path decides
        return None
    if type(doc) is not simdjson.Object:
        return None
    keys = list(doc)
    if len(set(keys)) != len(keys):  # orjson keeps the last of duplicate keys
        return None
    out: dict[str, Any] = {}
    expected = 0  # JSON arrays the parsed values account for
    arrays: int | None
    for key in keys:
        value = doc[key]
        if key in tensors and type(value) is simdjson.Array:
            bulk = _bulk_floats(value)
            if bulk is None:
                return None
            out[key], arrays = bulk
        else:
            out[key] = _plain(value)
            arrays = _arrays_in(out[key])
            if arrays is None or "[" in key:
                return None
        expected += arrays
    # Outside strings (none holds "[", checked above), each "[" in the body opens one array. If
    # the body has more than the values account for, some tensor leaf was an array, which
    # as_buffer would have flattened silently.
    if np.count_nonzero(np.frombuffer(body, dtype=np.uint8) == _OPEN) != expected:
        return None
    return out


@cache
def tensor_fields(model: type[BaseModel]) -> frozenset[str]:
    """Top-level fields of `model` typed Tensor (or Tensor | None): the bulk-parsed ones."""
    marker = get_args(Tensor)[1]  # pydantic moves it to metadata, or keeps it inside X | None
    return frozenset(
        name
        for name, field in model.model_fields.items()
        if marker in field.metadata
        or any(marker in get_args(arg) for arg in get_args(field.annotation))
    )


def validate(model: type[ModelT], data: Any, max_elements: int) -> ModelT:
    """Validate parsed JSON; tensors over max_elements fail with a 413-type error."""
    if not isinstance(data, dict):
        raise MalformedBody(f"the body must be a JSON object, not {type(data).__name__}")
    return model.model_validate(data, context={"max_elements": max_elements})


def encode(arr: np.ndarray | None, encoding: Encoding) -> Any:
    """A result tensor in the requested encoding; lists stay numpy for orjson to write."""
    if arr is None:
        return None
    if encoding == "b64":
        return encode_tensor(np.asarray(arr), "b64")
    if is_bfloat16(arr.dtype):  # orjson writes no bfloat16: its values, exactly, as float32
        arr = arr.astype(np.float32)
    # JSON has no NaN or Infinity: orjson writes them as null (documented in the schemas).
    return np.ascontiguousarray(arr)


def meta(result: Any, method: str, **extra: Any) -> dict[str, Any]:
    """A response's `meta`: the output's shape, the compute time and flops, the method."""
    return {
        "shape": list(result.output.shape),
        "elapsed_ms": result.elapsed_ms,
        "flops": result.flops,
        "method": method,
        **extra,
    }


def json_response(content: dict[str, Any], status_code: int = 200) -> Response:
    return Response(
        orjson.dumps(content, option=_DUMP_OPTIONS),
        status_code=status_code,
        media_type="application/json",
    )
