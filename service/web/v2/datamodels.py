"""The Open Inference Protocol's JSON documents as pydantic models (kserve's v2_datamodels).

Tensor data stays raw here (numpy reads it in service.web.v2.codec).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.core.tensor_codec import MAX_NDIM
from service.web.docs import example_config


class RequestInput(BaseModel):
    """$request_input: an input tensor (JSON `data`, or `binary_data_size` bytes after the JSON)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int] = Field(max_length=MAX_NDIM)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = Field(None, description="Nested or flat row-major values.")


class RequestOutput(BaseModel):
    """$request_output: an output to return; `binary_data: true` returns it as raw bytes."""

    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    """$inference_request."""

    model_config = example_config(
        {
            "id": "42",
            "parameters": {"causal": True},
            "inputs": [
                {"name": n, "shape": [2, 2], "datatype": "FP32", "data": [1, 0, 0, 1]}
                for n in ("q", "k", "v")
            ],
            "outputs": [{"name": "output"}],
        },
        extra="forbid",
    )

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class MetadataTensor(BaseModel):
    """$metadata_tensor; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    """$metadata_model_response."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    """$metadata_server_response."""

    name: str
    version: str
    extensions: list[str]


class ResponseOutput(BaseModel):
    """$response_output: `data`, or `parameters.binary_data_size` bytes after the JSON."""

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[float | None] | None = None


class InferenceResponse(BaseModel):
    """$inference_response."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    """Every error of the /v2 API."""

    error: str


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its $defs substituted, for a self-contained OpenAPI entry."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
