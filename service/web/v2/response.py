"""The Open Inference Protocol (KServe v2 / Triton) on the wire: responses out.

Which outputs a request asks for and in which form (JSON data or the binary tensor data
extension), and the response itself: JSON, or a JSON header followed by the outputs' raw
little-endian bytes; JSON compressed when the client accepts it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from service.web.v2.codec import HEADER_LENGTH, strict_bool
from service.web.v2.datamodels import InferenceRequest
from service.web.v2.errors import ProtocolError


@dataclass(frozen=True)
class OutputSelection:
    """Which outputs the request names (None: the model's defaults) and how to send each."""

    names: tuple[str, ...] | None
    binary: dict[str, bool]
    binary_default: bool

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def select_outputs(request: InferenceRequest, known: Iterable[str]) -> OutputSelection:
    known = tuple(known)
    default = strict_bool(
        request.parameters.get("binary_data_output", False), "parameter 'binary_data_output'"
    )
    if not request.outputs:  # absent or empty: the model's default outputs
        return OutputSelection(None, {}, default)
    binary: dict[str, bool] = {}
    for out in request.outputs:
        if out.name not in known:
            raise ProtocolError(
                f"unknown output '{out.name}'; this model's outputs are {', '.join(known)}"
            )
        if out.name in binary:
            raise ProtocolError(f"output '{out.name}' is requested twice")
        if "classification" in out.parameters:
            raise ProtocolError(f"output '{out.name}': classification is not supported")
        flag = out.parameters.get("binary_data")
        binary[out.name] = default if flag is None else strict_bool(flag, f"output '{out.name}'")
    return OutputSelection(tuple(binary), binary, default)


# ---------------------------------------------------------------------------------------------
# Responses


def _compress(body: bytes, accept_encoding: str | None) -> tuple[bytes, str | None]:
    """Compress a JSON response when the client accepts it (tritonclient's compression option).

    Binary responses are left alone: float bytes barely compress, and generic clients (httpx,
    browsers) accept gzip by default, so compressing them would only spend compute-slot time.
    """
    accepted = {p.split(";")[0].strip().lower() for p in (accept_encoding or "").split(",")}
    if "gzip" in accepted:
        deflater = zlib.compressobj(1, zlib.DEFLATED, 31)
        return deflater.compress(body) + deflater.flush(), "gzip"
    if "deflate" in accepted:
        return zlib.compress(body, 1), "deflate"
    return body, None


def infer_response(
    *,
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Iterable[tuple[str, np.ndarray]],
    selection: OutputSelection,
    parameters: Mapping[str, Any],
    accept_encoding: str | None = None,
) -> Response:
    """The response: JSON, or (any binary output) the JSON header followed by raw bytes."""
    entries: list[dict[str, Any]] = []
    buffers: list[np.ndarray] = []
    for name, arr in outputs:
        # Outputs are FP32 (the kernel's precision); little-endian C order on the wire.
        values = np.ascontiguousarray(arr, dtype="<f4")
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if selection.is_binary(name):
            entry["parameters"] = {"binary_data_size": values.nbytes}
            buffers.append(values)
        else:
            # JSON has no NaN or Infinity: orjson writes them as null (binary keeps them).
            entry["data"] = values.reshape(-1)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    headers: dict[str, str] = {}
    if buffers:
        headers[HEADER_LENGTH] = str(len(header))
        # As flat byte arrays: a memoryview of an empty N-d array cannot be cast to bytes.
        body = b"".join([header, *(b.reshape(-1).view(np.uint8).data for b in buffers)])
        media_type = "application/octet-stream"
    else:
        body, media_type = header, "application/json"
        body, encoding = _compress(body, accept_encoding)
        if encoding:
            headers["Content-Encoding"] = encoding
    return Response(body, headers=headers, media_type=media_type)
