"""JSON bodies in and out: parsing, model validation with the limits, tensor encoding.

One parse path for every JSON body of every front, linear in the body (which the body limit
bounds) and bounded in shape: no object holds more than MAX_FIELDS members, nothing nests deeper
than MAX_DEPTH, every string is valid Unicode. So neither the parse nor the validation after it
(whose errors grow with the members it is given) can cost more than a constant times the body.

Speed matters here (a 3 x 128 x 64 request must not cost tens of milliseconds). Tensors sent as
nested lists of floats are read straight into numpy by simdjson (`bulk tensors` below) without
one Python float per number; everything else is parsed by orjson, and the Tensor type turns the
remaining tensors into numpy in bulk. orjson writes numpy arrays directly (OPT_SERIALIZE_NUMPY)
instead of going through Python lists or FastAPI's jsonable_encoder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping
from functools import cache
from typing import Any, TypeVar, get_args

import numpy as np
import orjson
import simdjson
from pydantic import BaseModel
from starlette.responses import Response

from service.core.errors import InputError
from service.core.frameworks import is_bfloat16
from service.core.tensor_codec import MAX_NDIM, Encoding, encode_tensor
from service.core.tensor_field import Tensor
from service.web.problems import MalformedBody, UnsupportedMediaType

ModelT = TypeVar("ModelT", bound=BaseModel)

_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY

# Bounds on the shape of a body. No request model has more than a few dozen fields, nor nests
# deeper than a tensor of MAX_NDIM dimensions inside a few objects.
MAX_FIELDS = 256
MAX_DEPTH = 32

JSON_MEDIA_TYPES = "application/json or a +json type"


def require_json(headers: Mapping[str, str]) -> None:
    """415 unless the body is declared JSON: application/json or a +json type, UTF-8.

    Browsers post text/plain, form and multipart bodies (or none at all) cross-origin without a
    CORS preflight; only JSON content types make them ask first, so only those are read.
    """
    media_type, charset = media_type_of(headers.get("content-type"))
    if not is_json(media_type):
        got = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
        raise UnsupportedMediaType(f"the body must be JSON ({JSON_MEDIA_TYPES}); got {got}")
    if charset not in (None, "utf-8"):
        raise UnsupportedMediaType(f"JSON bodies are UTF-8; got charset {charset!r}")


def media_type_of(content_type: str | None) -> tuple[str, str | None]:
    """(media type, lower-cased; charset parameter or None) of a Content-Type header."""
    if not content_type:
        return "", None
    media_type, *params = content_type.split(";")
    charset = None
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media_type.strip().lower(), charset


def is_json(media_type: str) -> bool:
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def parse_json(body: bytes, tensors: Collection[str] = ()) -> Any:
    """The body as JSON; MalformedBody (400) if it is not JSON at all, InputError (422) if it is
    shaped beyond the bounds above (the error names where).

    Top-level fields named in `tensors` that hold rectangular nested lists of floats come back
    as float64 numpy arrays (what the Tensor type would make of them), read in bulk.
    """
    if tensors:
        fast = _parse_bulk_tensors(body, frozenset(tensors))
        if fast is not None:
            return fast
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson rejects NaN, Infinity and 1e400; the standard parser accepts them, so the
        # request reaches validation, which names the field that holds them (422). It is told
        # the body is UTF-8 (as orjson and simdjson read it), never left to guess UTF-16 or 32.
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            raise MalformedBody(f"the body is not valid JSON: {exc}") from None
        # It also accepts lone UTF-16 surrogates ("\ud800"), which orjson and simdjson refuse
        # and no answer could echo: the walk names the field holding one.
        check_structure(data, unicode=True)
        return data
    check_structure(data)
    return data


def check_structure(value: Any, at: tuple[str | int, ...] = (), *, unicode: bool = False) -> None:
    """InputError naming the place where parsed JSON has an object of more than MAX_FIELDS
    members or nests deeper than MAX_DEPTH (or, with `unicode`, a string or key that is not
    valid Unicode: a lone surrogate).

    Linear, and cheap on tensors: an array is descended into only when its first item is an
    array or object, so a list of numbers costs one look at its first item, a nested tensor
    one per row. Whatever hides behind a number (a ragged [1, {...}]) is never validated as an
    object: the tensor decoders refuse it whole. Places are named down to the last object.
    """
    # Each entry: (place, the arrays and objects found there at the current depth).
    level: list[tuple[tuple[str | int, ...], list[Any]]] = [(at, [value])]
    depth = 0
    while level:
        depth += 1
        deeper: list[tuple[tuple[str | int, ...], list[Any]]] = []
        for loc, nodes in level:
            if depth > MAX_DEPTH:
                raise InputError(loc or ("body",), f"nests deeper than {MAX_DEPTH} levels")
            for node in nodes:
                kind = type(node)
                if kind is dict:
                    _check_object(loc, node, unicode, deeper)
                elif kind is list and node:
                    if unicode:
                        _check_strings(loc, node, len(nodes) == 1)
                    if type(node[0]) is list or type(node[0]) is dict:
                        deeper.append((loc, node))
        level = deeper


def _check_strings(loc: tuple[str | int, ...], items: list[Any], indexed: bool) -> None:
    kinds = set(map(type, items))
    if str in kinds:
        # An index is named when the strings are the items of one array (a token list).
        strings = items if kinds == {str} else [s for s in items if type(s) is str]
        _check_text(loc, strings, indexed and kinds == {str})


def _check_object(
    loc: tuple[str | int, ...], node: dict[str, Any], unicode: bool, deeper: list[Any]
) -> None:
    if len(node) > MAX_FIELDS:
        raise InputError(
            loc or ("body",),
            f"an object of {len(node)} members; at most {MAX_FIELDS} are accepted",
        )
    if unicode:
        _check_text(loc, list(node))
    for key, item in node.items():
        if type(item) in (list, dict):
            deeper.append(((*loc, key), [item]))
        elif unicode and type(item) is str:
            _check_text((*loc, key), [item])


def _check_text(loc: tuple[str | int, ...], texts: list[str], indexed: bool = False) -> None:
    try:
        "".join(texts).encode("utf-8")
    except UnicodeEncodeError:
        if indexed:
            loc = (*loc, next(i for i, t in enumerate(texts) if _bad(t)))
        raise InputError(
            loc or ("body",), "holds text that is not valid Unicode (a lone UTF-16 surrogate)"
        ) from None


def _bad(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
    if type(doc) is not simdjson.Object or len(doc) > MAX_FIELDS:
        return None  # the general path explains it
    out: dict[str, Any] = {}
    expected = 0  # JSON arrays the parsed values account for
    arrays: int | None
    # Looking a key up in a simdjson object is a linear scan (and items() would convert every
    # value to Python): with at most MAX_FIELDS members (checked above) the lookups cost a
    # bounded number of comparisons whatever the body.
    for key in doc:
        if key in out:  # orjson keeps the last of duplicate keys
            return None
        value = doc[key]
        if key in tensors and type(value) is simdjson.Array:
            bulk = _bulk_floats(value)
            if bulk is None:
                return None
            out[key], arrays = bulk
        else:
            out[key] = _plain(value)
            check_structure(out[key], (key,))
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
