"""`Tensor`: the pydantic field type of every tensor in the options and request models.

A field typed `Tensor` (or `Tensor | None`) accepts every form service.core.tensor_codec reads
and holds a numpy array after validation; its JSON schema documents those forms. An element
limit can be passed as validation context ({"max_elements": n}): a larger tensor fails with the
error type LIMIT_ERROR_TYPE, which the HTTP service answers with 413.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from service.core.tensor_codec import WIRE_DTYPES, TensorError, TensorLimitError, decode_tensor

LIMIT_ERROR_TYPE = "tensor_too_large"

_TENSOR_JSON_SCHEMA: JsonSchemaValue = {
    "title": "Tensor",
    "description": (
        "A tensor: a nested list of numbers, or {dtype, shape, data: [flat numbers]}, "
        "or {dtype, shape, b64: base64 of little-endian C-order bytes}."
    ),
    "anyOf": [
        {"type": "array", "items": {}},
        {
            "type": "object",
            "properties": {
                "dtype": {"type": "string", "enum": list(WIRE_DTYPES)},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "data": {"type": "array", "items": {}},
                "b64": {"type": "string"},
            },
            "required": ["shape"],
        },
    ],
    "examples": [[[0.1, 0.2], [0.3, 0.4]]],
}


class _TensorAnnotation:
    """Pydantic glue: validate with decode_tensor, document with the schema above."""

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def validate(value: Any, info: core_schema.ValidationInfo) -> np.ndarray:
            # The HTTP service passes its element limit as validation context.
            context = info.context or {}
            try:
                return decode_tensor(value, context.get("max_elements"))
            except TensorLimitError as exc:
                raise PydanticCustomError(LIMIT_ERROR_TYPE, str(exc)) from None
            except TensorError as exc:
                raise ValueError(str(exc)) from None

        return core_schema.with_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda a: a.tolist() if isinstance(a, np.ndarray) else a
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return dict(_TENSOR_JSON_SCHEMA)


# Use as a field type: `mask: Tensor | None = None` gives a numpy array after validation.
Tensor = Annotated[np.ndarray, _TensorAnnotation]
