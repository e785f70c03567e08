"""JSON bodies in and out: orjson parsing, model validation with the limits, tensor encoding.

Speed matters here (a 3 x 128 x 64 request must not cost tens of milliseconds): orjson parses,
the Tensor type turns each tensor into numpy in bulk, and orjson writes numpy arrays directly
(OPT_SERIALIZE_NUMPY) instead of going through Python lists or FastAPI's jsonable_encoder.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel
from starlette.responses import Response

from service.problems import MalformedBody
from service.tensors import Encoding, encode_tensor

ModelT = TypeVar("ModelT", bound=BaseModel)

_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def parse_json(body: bytes) -> Any:
    """The body as JSON; MalformedBody (400) if it is not JSON at all."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson rejects NaN, Infinity and 1e400; the standard parser accepts them, so the
        # request reaches validation, which names the field that holds them (422).
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise MalformedBody(f"the body is not valid JSON: {exc}") from None


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
    # JSON has no NaN or Infinity: orjson writes them as null (documented in the schemas).
    return np.ascontiguousarray(arr)


def json_response(content: dict[str, Any], status_code: int = 200) -> Response:
    return Response(
        orjson.dumps(content, option=_DUMP_OPTIONS),
        status_code=status_code,
        media_type="application/json",
    )
