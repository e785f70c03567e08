"""A Python client of the HTTP service: numpy arrays in, numpy arrays out.

    from service.client import AttentionClient
    with AttentionClient("http://127.0.0.1:8000") as client:
        res = client.attention(q, k, v, causal=True, heatmap=True)
        res.output                                   # numpy array
        png = client.heatmap(res.heatmaps[0]["id"])  # PNG bytes

Tensors travel as base64 of their bytes (exact and compact); any 4xx/5xx answer raises
ServiceError carrying the problem document (status, title, detail, errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from service.core.frameworks import is_array
from service.core.tensor_codec import decode_tensor, encode_tensor

_DEFAULT_URL = "http://127.0.0.1:8000"


class ServiceError(Exception):
    """The service answered with an error; `problem` is its RFC 9457 document."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", ""))
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        super().__init__(f"{status} {self.title}: {self.detail}")


@dataclass(frozen=True)
class Result:
    """A response: tensors as numpy arrays, heatmap entries and meta as given, `raw` the rest."""

    output: np.ndarray
    weights: np.ndarray | None
    lse: np.ndarray | None
    heatmaps: list[dict[str, Any]]
    meta: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)


def _encode(value: Any) -> Any:
    """Arrays (numpy, torch, TensorFlow, JAX, ...) become {dtype, shape, b64}; containers are
    walked."""
    if isinstance(value, np.ndarray) or is_array(value):
        arr = decode_tensor(value)
        if arr.dtype.kind == "f" and arr.dtype.name not in ("float16", "float32", "float64"):
            arr = arr.astype(np.float32)
        return encode_tensor(arr, "b64")
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode(value: Any) -> np.ndarray | None:
    return None if value is None else decode_tensor(value)


class AttentionClient:
    """Calls /v1/attention, /v1/multihead, /v1/tokens and fetches heatmap PNGs."""

    def __init__(
        self,
        base_url: str = _DEFAULT_URL,
        *,
        timeout: float = 60.0,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers=headers, transport=transport
        )

    def __enter__(self) -> AttentionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = self._http.post(path, json=_encode(body))
        self._raise_for_problem(response)
        return response.json()

    @staticmethod
    def _raise_for_problem(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            problem = response.json()
        except ValueError:
            problem = {"title": response.reason_phrase, "detail": response.text[:500]}
        if not isinstance(problem, dict):
            problem = {"title": response.reason_phrase, "detail": str(problem)[:500]}
        raise ServiceError(response.status_code, problem)

    @staticmethod
    def _result(data: dict[str, Any]) -> Result:
        return Result(
            output=decode_tensor(data["output"]),
            weights=_decode(data.get("weights")),
            lse=_decode(data.get("lse")),
            heatmaps=list(data.get("heatmaps") or []),
            meta=dict(data.get("meta") or {}),
            raw=data,
        )

    def attention(self, q: Any, k: Any, v: Any, **options: Any) -> Result:
        """POST /v1/attention; options as in service.AttentionOptions (+ heatmap)."""
        return self._result(self._post("/v1/attention", {"q": q, "k": k, "v": v, **options}))

    def multihead(
        self, query: Any, key: Any = None, value: Any = None, *, num_heads: int, **options: Any
    ) -> Result:
        """POST /v1/multihead; weights may be a dict of arrays (torch's layout)."""
        body: dict[str, Any] = {"query": query, "num_heads": num_heads, **options}
        if key is not None:
            body["key"] = key
        if value is not None:
            body["value"] = value
        return self._result(self._post("/v1/multihead", body))

    def tokens(self, tokens: list[str] | str, **options: Any) -> Result:
        """POST /v1/tokens with a token list, or a string split on whitespace."""
        source = {"text": tokens} if isinstance(tokens, str) else {"tokens": list(tokens)}
        options.setdefault("encoding", "b64")
        return self._result(self._post("/v1/tokens", {**source, **options}))

    def heatmap(self, id_or_url: str) -> bytes:
        """The PNG bytes of a stored heatmap, by id or by the url a response gave."""
        path = id_or_url if id_or_url.startswith("/") else f"/v1/heatmaps/{id_or_url}.png"
        response = self._http.get(path)
        self._raise_for_problem(response)
        return response.content
