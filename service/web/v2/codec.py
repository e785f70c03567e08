"""The Open Inference Protocol (KServe v2 / Triton) on the wire: requests in.

What this module knows is the protocol, not attention: the request body (JSON, optionally
followed by the binary tensor data extension's raw bytes, possibly compressed), tensors in both
forms (JSON data, nested or flat row-major; little-endian binary), and the parameters (the
model's, the protocol's, a sequence's). Responses are written by response.py, the documents are
in datamodels.py, the models themselves in models.py.

Errors are raised as the service's own exceptions (InputError, LimitError, ProtocolError...);
the app's exception handlers answer them in the protocol's form on /v2 (errors.py).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from service.core.errors import LimitError
from service.core.frameworks import bfloat16_from_bits
from service.core.tensor_codec import TensorLimitError, check_elements
from service.web import wire
from service.web.problems import BodyTooLarge, UnsupportedMediaType
from service.web.v2.datamodels import InferenceRequest, RequestInput
from service.web.v2.errors import ProtocolError

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "parameters")

# Little-endian wire dtypes of the supported datatypes; BF16 travels as its raw 16 bits.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),
}
FLOAT_TYPES = ("FP32", "FP16", "FP64", "BF16")

# Request parameters that belong to the protocol (or to Triton's scheduler) rather than a model:
# binary_data_output is honoured; priority and timeout have no meaning for a stateless model
# without a batcher and are accepted and ignored, as Triton does for such models.
_PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout"})
_SEQUENCE_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end"})


# ---------------------------------------------------------------------------------------------
# Tensors


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its advertised datatype and shape, what it accepts."""

    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: variable
    accepts: tuple[str, ...] = ()  # datatypes an input accepts; () = only `datatype`
    optional: bool = False

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @property
    def datatypes(self) -> tuple[str, ...]:
        return self.accepts or (self.datatype,)


# The JSON types each datatype's `data` may hold: a number is no BOOL, a boolean no number, a
# string never a tensor value (BF16 travels only as binary data).
_JSON_TYPES: dict[str, frozenset[type]] = {
    "BOOL": frozenset({bool}),
    "INT32": frozenset({int}),
    "INT64": frozenset({int}),
    **{t: frozenset({int, float}) for t in ("FP16", "FP32", "FP64")},
}
_JSON_NAMES = {"BOOL": "true/false", "INT32": "whole numbers", "INT64": "whole numbers"}


def _json_leaf_types(data: Any) -> set[type]:
    """The types of the values of nested lists (one level at a time, in C); list stands for
    arrays mixed with values (ragged)."""
    level: list[Any] = [data]
    kinds: set[type] = {list}
    while kinds == {list}:
        level = list(chain.from_iterable(level))
        kinds = set(map(type, level))
    return kinds


def _json_values(name: str, datatype: str, data: Any) -> np.ndarray:
    """JSON `data` (nested or flat) as an array of the datatype's values; row-major order.

    Each datatype accepts only its own JSON type (FP32 no strings or booleans, INT no fractions,
    BOOL only true and false), checked on the values' types before numpy converts any of them.
    """
    if datatype == "BF16":
        raise ProtocolError(f"input '{name}': BF16 travels only as binary data")
    if not isinstance(data, list):
        raise ProtocolError(f"input '{name}': data must be a list (flat, or nested row-major)")
    kinds = _json_leaf_types(data)
    allowed = _JSON_TYPES[datatype]
    if not kinds <= allowed:
        what = _JSON_NAMES.get(datatype, "numbers")
        if list in kinds:
            raise ProtocolError(
                f"input '{name}': data must be {what}, as a flat list or nested lists of equal "
                "depth"
            )
        found = ", ".join(sorted(_JSON_TYPE_NAMES.get(k, k.__name__) for k in kinds - allowed))
        raise ProtocolError(f"input '{name}': {datatype} data holds only {what}, not {found}")
    try:
        values = np.array(data, dtype=np.float64 if datatype in FLOAT_TYPES else None)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(
            f"input '{name}': data must be {_JSON_NAMES.get(datatype, 'numbers')}, as a flat "
            "list or nested lists of equal length"
        ) from None
    if datatype in ("INT32", "INT64") and values.size:
        info = np.iinfo(DATATYPES[datatype])
        if values.dtype.kind not in "iu" or values.min() < info.min or values.max() > info.max:
            raise ProtocolError(f"input '{name}': a value is outside the range of {datatype}")
    with np.errstate(over="ignore"):  # beyond FP16's range becomes inf, reported as such later
        return values.astype(DATATYPES[datatype].newbyteorder("="), copy=False)


_JSON_TYPE_NAMES = {
    bool: "booleans",
    int: "integers",
    float: "fractions",
    str: "strings",
    dict: "objects",
    type(None): "nulls",
}


def _binary_values(name: str, datatype: str, raw: memoryview) -> np.ndarray:
    """Little-endian bytes as an array (a view into the body when aligned)."""
    wire_dtype = DATATYPES[datatype]
    values = np.frombuffer(raw, dtype=wire_dtype)
    if not values.flags.aligned:  # the JSON header's length puts data at any offset
        values = values.copy()
    if datatype == "BOOL" and values.size and values.view(np.uint8).max() > 1:
        raise ProtocolError(f"input '{name}': BOOL bytes must be 0 or 1")
    if datatype == "BF16":  # bfloat16 values (ml_dtypes), as the kernel reads them
        return bfloat16_from_bits(values)
    return values.astype(wire_dtype.newbyteorder("="), copy=False)


class _BinaryReader:
    """Hands out the binary section's bytes in input order."""

    def __init__(self, data: memoryview | None) -> None:
        self.data = data
        self.offset = 0

    def take(self, name: str, size: int) -> memoryview:
        if self.data is None:
            raise ProtocolError(
                f"input '{name}': binary_data_size is set but the request has no binary data "
                f"(the {HEADER_LENGTH} header is missing)"
            )
        end = self.offset + size
        if end > len(self.data):
            left = len(self.data) - self.offset
            raise ProtocolError(
                f"input '{name}': binary_data_size is {size} bytes but only {left} bytes of "
                "binary data are left in the body"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def check_consumed(self) -> None:
        if self.data is not None and self.offset != len(self.data):
            raise ProtocolError(
                f"the body has {len(self.data) - self.offset} bytes of binary data that no input "
                "claims (the inputs' binary_data_size add up to less than the body holds)"
            )


def decode_inputs(
    inputs: Iterable[RequestInput],
    binary: memoryview | None,
    specs: Mapping[str, TensorSpec],
    max_elements: int,
) -> dict[str, np.ndarray]:
    """Each input as a numpy array, checked against the model's inputs and the element limit."""
    reader = _BinaryReader(binary)
    arrays: dict[str, np.ndarray] = {}
    for item in inputs:
        name = item.name
        spec = specs.get(name)
        if spec is None:
            raise ProtocolError(
                f"unknown input '{name}'; this model's inputs are {', '.join(specs)}"
            )
        if name in arrays:
            raise ProtocolError(f"input '{name}' is given twice")
        if item.datatype not in spec.datatypes:
            raise ProtocolError(
                f"input '{name}': datatype {item.datatype!r} is not supported; expected "
                f"{' or '.join(spec.datatypes)}"
            )
        shape = tuple(item.shape)
        if any(d < 0 for d in shape):
            raise ProtocolError(f"input '{name}': shape {list(shape)} has a negative dimension")
        n = math.prod(shape)
        try:
            check_elements(shape, max_elements)
        except TensorLimitError as exc:
            raise LimitError(("inputs", name), f"{exc} (ATTN_MAX_ELEMENTS)") from None
        if "shared_memory_region" in item.parameters:
            raise ProtocolError(
                f"input '{name}': the shared memory extension is not supported; send the data "
                "in the body (JSON or binary)"
            )
        size = item.parameters.get("binary_data_size")
        if size is not None:
            if item.data is not None:
                raise ProtocolError(f"input '{name}': give either data or binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(
                    f"input '{name}': binary_data_size must be a non-negative integer"
                )
            needed = n * DATATYPES[item.datatype].itemsize
            if size != needed:
                raise ProtocolError(
                    f"input '{name}': binary_data_size is {size} bytes but shape {list(shape)} "
                    f"of {item.datatype} needs {needed}"
                )
            values = _binary_values(name, item.datatype, reader.take(name, size))
        elif item.data is None:
            raise ProtocolError(f"input '{name}' has neither data nor binary_data_size")
        else:
            values = _json_values(name, item.datatype, item.data)
            if values.size != n:
                raise ProtocolError(
                    f"input '{name}': data has {values.size} values but shape {list(shape)} "
                    f"needs {n}"
                )
        arrays[name] = values.reshape(shape)
    reader.check_consumed()
    missing = [s.name for s in specs.values() if not s.optional and s.name not in arrays]
    if missing:
        raise ProtocolError(f"missing required input(s): {', '.join(missing)}")
    return arrays


# ---------------------------------------------------------------------------------------------
# Body, parameters and requested outputs


def _decompress(body: bytes, encoding: str, max_bytes: int) -> bytes:
    """A gzip or deflate (zlib) body, inflated to at most max_bytes (no decompression bombs)."""
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise ProtocolError(
            f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
        )
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise ProtocolError(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > max_bytes or inflater.unconsumed_tail:
        raise BodyTooLarge(
            f"the decompressed body exceeds the limit of {max_bytes} bytes (ATTN_MAX_BODY_BYTES)"
        )
    if not inflater.eof:
        raise ProtocolError(f"the {encoding} body is truncated")
    return out


BINARY_MEDIA_TYPE = "application/octet-stream"


def check_content_type(headers: Mapping[str, str]) -> None:
    """415 unless the body is JSON (application/json or +json), or the protocol's binary form:
    application/octet-stream, the JSON header then the tensors' bytes.

    tritonclient sends no Content-Type at all, so none is accepted too, but only from a client
    that is not a browser (no Origin header): a web page could otherwise post a body without
    Content-Type to a local keyless server, cross-origin, without a CORS preflight.
    """
    media_type, charset = wire.media_type_of(headers.get("content-type"))
    if not media_type and "origin" not in headers:
        return
    if media_type == BINARY_MEDIA_TYPE or (wire.is_json(media_type) and charset in (None, "utf-8")):
        return
    got = f"Content-Type {headers.get('content-type', '')!r}"
    if not media_type:
        got = "no Content-Type (from a browser, which sends Origin)"
    raise UnsupportedMediaType(
        f"the body must be JSON ({wire.JSON_MEDIA_TYPES}, UTF-8) or {BINARY_MEDIA_TYPE} (the "
        f"JSON header, then binary tensor data); got {got}"
    )


def split_body(
    body: bytes, header_length: str | None, content_encoding: str | None, max_bytes: int
) -> tuple[bytes, memoryview | None]:
    """(JSON header, binary section or None) of a request body."""
    if content_encoding and content_encoding.strip().lower() != "identity":
        body = _decompress(body, content_encoding.strip().lower(), max_bytes)
    if header_length is None:
        return body, None
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(
            f"{HEADER_LENGTH} must be an integer, not {header_length[:40]!r}"
        ) from None
    if n < 0:
        raise ProtocolError(f"{HEADER_LENGTH} must be >= 0, not {n}")
    if n > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {n} bytes but the body has only {len(body)} bytes")
    return body[:n], memoryview(body)[n:]


def parse_request(header: bytes) -> InferenceRequest:
    """The JSON header as an InferenceRequest (400 if it is not one)."""
    data = wire.parse_json(header)
    if not isinstance(data, dict):
        raise ProtocolError(f"the request must be a JSON object, not {type(data).__name__}")
    return InferenceRequest.model_validate(data)


def model_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The request parameters meant for the model (the protocol's own are taken out)."""
    return {
        k: v
        for k, v in parameters.items()
        if k not in _PROTOCOL_PARAMETERS and k not in _SEQUENCE_PARAMETERS
    }


@dataclass(frozen=True)
class Sequence:
    """Triton's sequence parameters: the id (an unsigned integer or a string the client
    chose), and whether this request starts or ends the sequence."""

    id: int | str
    start: bool
    end: bool


_MAX_SEQUENCE_ID_CHARS = 128


def sequence_of(parameters: Mapping[str, Any]) -> Sequence | None:
    """The request's sequence, or None (no sequence_id, or 0 / "" as Triton's clients send)."""
    sid = parameters.get("sequence_id", 0)
    start = strict_bool(parameters.get("sequence_start", False), "parameter 'sequence_start'")
    end = strict_bool(parameters.get("sequence_end", False), "parameter 'sequence_end'")
    if isinstance(sid, bool) or not isinstance(sid, int | str):
        raise ProtocolError("parameter 'sequence_id' must be an unsigned integer or a string")
    if isinstance(sid, int) and not 0 <= sid < 1 << 64:
        raise ProtocolError("parameter 'sequence_id' must be an unsigned 64-bit integer")
    if isinstance(sid, str) and len(sid) > _MAX_SEQUENCE_ID_CHARS:
        raise ProtocolError(
            f"parameter 'sequence_id' is longer than {_MAX_SEQUENCE_ID_CHARS} characters"
        )
    if sid in (0, ""):
        if start or end:
            name = "sequence_start" if start else "sequence_end"
            raise ProtocolError(f"parameter '{name}' needs a sequence_id")
        return None
    return Sequence(sid, start, end)


def strict_bool(value: Any, where: str) -> bool:
    """A boolean parameter, strictly: true or false, nothing that merely looks like one."""
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be true or false")
    return value
