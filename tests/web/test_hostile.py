"""Hostile requests against the real server process, over raw sockets.

A table of malformed, oversized, deeply nested, lying and slow requests: each must get its 4xx
(problem+json, or the protocol's {"error"} on /v2), the process must survive (a follow-up
/healthz answers, the process is still running), and its resident memory must come back to
its baseline after the whole table has been sent several times.
"""

from __future__ import annotations

import gzip
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.http import Server

MiB = 1 << 20
MAX_BODY = 4 * MiB
MAX_ELEMENTS = 1 << 16
BODY_TIMEOUT_S = 2
# Resident memory may grow this much over three passes of the hostile table after two more.
RSS_MARGIN = 50 * MiB


# The `server` fixture's environment and flags (tests/conftest.py).
SERVER_ENV = {
    "ATTN_MAX_BODY_BYTES": str(MAX_BODY),
    "ATTN_MAX_ELEMENTS": str(MAX_ELEMENTS),
    "ATTN_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "ATTN_API_KEYS": "",
}
SERVER_ARGS = ("--log-level", "warning", "--no-access-log")


# ---------------------------------------------------------------------------------------------
# Raw HTTP


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    headers = {k.lower(): v for k, v in response.getheaders()}
    return response.status, headers, body


def send_raw(
    srv: Server,
    head: bytes,
    body: bytes | Callable[[socket.socket], None] = b"",
    *,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    """Send a request head and body exactly as given (or let `body` write to the socket), then
    read the answer. A server that answers and closes before the body is all sent is fine."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as sock:
        try:
            sock.sendall(head)
            if callable(body):
                body(sock)
            else:
                for i in range(0, len(body), 1 << 16):
                    if answered(sock):
                        break  # refused from the head or mid-body: stop writing, read
                    sock.sendall(body[i : i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-body: the answer is already on its way
        return _read_response(sock)


def answered(sock: socket.socket) -> bool:
    """The server has started to answer (or closed): sending more would only be refused."""
    return bool(select.select([sock], [], [], 0)[0])


def request(
    srv: Server,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    if "Content-Length" not in all_headers and "Transfer-Encoding" not in all_headers:
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return send_raw(srv, head, body, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The table

SMALL = {"q": [[0.1, 0.2], [0.3, 0.4]], "k": [[0.1, 0.2], [0.3, 0.4]], "v": [[1.0], [2.0]]}


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def _chunked(total: int, chunk: int = 64 * 1024) -> Callable[[socket.socket], None]:
    """A chunked body of `total` bytes of JSON-ish filler, without any Content-Length."""

    def write(sock: socket.socket) -> None:
        sent = 0
        piece = b" " * chunk
        while sent < total and not answered(sock):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        sock.sendall(b"0\r\n\r\n")

    return write


def _infer_binary(header_length: str, body: bytes) -> dict[str, Any]:
    return {
        "path": "/v2/models/attention/infer",
        "body": body,
        "headers": {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": header_length,
        },
    }


_INFER_HEADER = js(
    {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}
            for n in ("q", "k", "v")
        ]
    }
)

# name -> (request, expected status). A request is keyword arguments of `request` (method POST
# and path /v1/attention unless given) or ("raw", head, body) for bytes sent as they are.
HOSTILE: dict[str, tuple[dict[str, Any], int]] = {
    "truncated JSON": ({"body": b'{"q": [[0.1, 0.2], [0.3'}, 400),
    "truncated mid-string": ({"body": b'{"q": "abc'}, 400),
    "not UTF-8": ({"body": b'{"q": "\xff\xfe"}'}, 400),
    "JSON array body": ({"body": b"[1, 2, 3]"}, 400),
    "empty body": ({"body": b""}, 400),
    "deep nesting, 100k [": ({"body": b"[" * 100_000}, 400),
    "deep nesting, closed": ({"body": b"[" * 100_000 + b"]" * 100_000}, 400),
    "deep nesting inside a tensor": (
        {"body": b'{"q": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"},
        400,
    ),
    "deep nesting of objects": ({"body": b'{"a":' * 50_000 + b"1" + b"}" * 50_000}, 400),
    "10^6-element list as a tensor": (
        {"body": js({**SMALL, "q": [0.5] * 1_000_000})},
        413,
    ),
    "10^6 empty rows": ({"body": js({**SMALL, "q": [[]] * 1_000_000})}, 413),
    "10^6 key_lengths": ({"body": js({**SMALL, "key_lengths": [1] * 1_000_000})}, 422),
    "10^6 global tokens": (
        {"body": js({**SMALL, "window": {"left": 1}, "global_tokens": [5] * 1_000_000})},
        422,
    ),
    "10^6 tokens": ({"path": "/v1/tokens", "body": js({"tokens": ["a"] * 1_000_000})}, 413),
    "10^6 heads to draw": (
        {"body": js({**SMALL, "heatmap": {"heads": [7] * 1_000_000}})},
        422,
    ),
    "shape claiming 2^62 elements": (
        {"body": js({**SMALL, "q": {"dtype": "float32", "shape": [2**31, 2**31], "data": [1]}})},
        413,
    ),
    "shape with a 10^30 dimension": (
        {"body": js({**SMALL, "q": {"dtype": "float32", "shape": [10**30], "data": [1]}})},
        422,
    ),
    "strings where numbers belong": ({"body": js({**SMALL, "q": [["a", "b"], ["c", "d"]]})}, 422),
    "string scale": ({"body": js({**SMALL, "scale": "huge"})}, 422),
    "string shape": (
        {"body": js({**SMALL, "q": {"dtype": "float32", "shape": ["2", "2"], "data": [1] * 4}})},
        422,
    ),
    "dtype as a list": (
        {"body": js({**SMALL, "q": {"dtype": ["float32"], "shape": [2, 2], "data": [1] * 4}})},
        422,
    ),
    "NaN and Infinity literals": (
        {"body": b'{"q": [[NaN, Infinity]], "k": [[1, 2]], "v": [[1]]}'},
        422,
    ),
    "number 1e400": ({"body": b'{"q": [[1e400, 1]], "k": [[1, 2]], "v": [[1]]}'}, 422),
    "num_heads as a word": (
        {"path": "/v1/multihead", "body": js({"query": [[[1.0, 2.0]]], "num_heads": "many"})},
        422,
    ),
    "lone surrogate token": ({"path": "/v1/tokens", "body": b'{"text": "a \\ud800 b"}'}, 422),
    "b64 wrong padding": (
        {"body": js({**SMALL, "q": {"dtype": "float32", "shape": [2, 2], "b64": "AAAAAAA"}})},
        422,
    ),
    "b64 wrong length": (
        {"body": js({**SMALL, "q": {"dtype": "float32", "shape": [2, 2], "b64": "AAAA"}})},
        422,
    ),
    "b64 not base64": (
        {"body": js({**SMALL, "q": {"dtype": "float32", "shape": [2, 2], "b64": "!!!!" * 4}})},
        422,
    ),
    "b64 claiming a huge shape": (
        {"body": js({**SMALL, "q": {"dtype": "float32", "shape": [2**40], "b64": "AAAA"}})},
        413,
    ),
    "v2 header length beyond the body": (_infer_binary("1000000000", _INFER_HEADER), 400),
    "v2 header length negative": (_infer_binary("-5", _INFER_HEADER), 400),
    "v2 header length not a number": (_infer_binary("12abc", _INFER_HEADER), 400),
    "v2 binary data shorter than declared": (
        _infer_binary(str(len(_INFER_HEADER)), _INFER_HEADER + b"\0" * 20),
        400,
    ),
    "v2 gzip bomb": (
        {
            "path": "/v2/models/attention/infer",
            "body": gzip.compress(b"0" * (64 * MiB), compresslevel=9),
            "headers": {"Content-Encoding": "gzip"},
        },
        413,
    ),
    "v2 truncated gzip": (
        {
            "path": "/v2/models/attention/infer",
            "body": gzip.compress(js({"inputs": []}))[:-8],
            "headers": {"Content-Encoding": "gzip"},
        },
        400,
    ),
    "path traversal, encoded slashes": (
        {"method": "GET", "path": "/v1/heatmaps/..%2F..%2F..%2Fetc%2Fpasswd.png"},
        404,
    ),
    "path traversal, encoded dots": (
        {"method": "GET", "path": "/v1/heatmaps/%2e%2e%2f%2e%2e%2fetc%2fpasswd.png"},
        404,
    ),
    "path traversal, plain": ({"method": "GET", "path": "/v1/heatmaps/../../etc/passwd.png"}, 404),
    "path traversal, backslashes": (
        {"method": "GET", "path": "/v1/heatmaps/..%5C..%5Cetc%5Cpasswd.png"},
        404,
    ),
    "heatmap id with a NUL": ({"method": "GET", "path": "/v1/heatmaps/abc%00def.png"}, 404),
    "heatmap id of 8 KB": ({"method": "GET", "path": "/v1/heatmaps/" + "A" * 8192 + ".png"}, 404),
    "static file traversal": ({"method": "GET", "path": "/static/..%2F..%2Fapp.py"}, 404),
    "declared body of 10 GB": ({"headers": {"Content-Length": str(10 * 1024**3)}}, 413),
    "Content-Length not a number": ({"headers": {"Content-Length": "12abc"}}, 400),
    "oversized body with Content-Length": ({"body": b" " * (MAX_BODY + 1)}, 413),
    "oversized chunked body": (
        {"body": _chunked(MAX_BODY + MiB), "headers": {"Transfer-Encoding": "chunked"}},
        413,
    ),
}


def send(srv: Server, spec: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    spec = dict(spec)
    method = spec.pop("method", "POST")
    path = spec.pop("path", "/v1/attention")
    body = spec.pop("body", b"")
    headers = spec.pop("headers", None)
    if callable(body):
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return send_raw(srv, head, body)
    return request(srv, method, path, body, headers)


def assert_error_answer(name: str, answer: tuple[int, dict[str, str], bytes], status: int) -> None:
    got, headers, body = answer
    assert got == status, (name, got, body[:300])
    ctype = headers.get("content-type", "")
    # uvicorn itself answers what never reaches the app (a malformed request line) in plain text.
    if ctype.startswith("application/problem+json"):
        problem = json.loads(body)
        assert problem["status"] == status and problem["detail"], (name, problem)
    elif ctype.startswith("application/json"):
        assert json.loads(body)["error"], (name, body[:300])  # the /v2 protocol's form


def healthy(srv: Server) -> None:
    assert srv.proc.poll() is None, f"the server died: {srv.log.read_text()[-3000:]}"
    status, _, body = request(srv, "GET", "/healthz", timeout=10)
    assert status == 200, body


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_request_gets_its_4xx(server: Server, name: str) -> None:
    spec, status = HOSTILE[name]
    assert_error_answer(name, send(server, spec), status)
    healthy(server)


def test_slow_body_is_cut_off_with_408_while_others_are_served(server: Server) -> None:
    """A client that sends a few bytes of its body and stalls gets 408 after the body timeout;
    meanwhile the server answers everyone else."""
    head = (
        b"POST /v1/attention HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    answer: dict[str, Any] = {}

    def stall(sock: socket.socket) -> None:
        sock.sendall(b'{"q": [[1')  # ... and nothing more

    def slow_client() -> None:
        start = time.monotonic()
        answer["response"] = send_raw(server, head, stall, timeout=BODY_TIMEOUT_S + 20)
        answer["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=slow_client)
    thread.start()
    time.sleep(0.3)
    healthy(server)  # not blocked behind the stalled body
    status, _, _ = request(server, "POST", "/v1/attention", js(SMALL))
    assert status == 200
    thread.join(BODY_TIMEOUT_S + 30)
    assert not thread.is_alive()
    assert_error_answer("slow body", answer["response"], 408)
    assert answer["seconds"] < BODY_TIMEOUT_S + 10
    healthy(server)


def test_slow_trickle_cannot_extend_the_body_deadline(server: Server) -> None:
    """One byte per half second never finishes the body: the deadline counts from the start."""
    head = (
        b"POST /v1/attention HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )

    def trickle(sock: socket.socket) -> None:
        deadline = time.monotonic() + BODY_TIMEOUT_S + 10
        while time.monotonic() < deadline:
            try:
                sock.sendall(b" ")
            except OSError:
                return  # the server answered and closed
            time.sleep(0.5)

    start = time.monotonic()
    answer = send_raw(server, head, trickle, timeout=BODY_TIMEOUT_S + 30)
    assert_error_answer("trickle", answer, 408)
    assert time.monotonic() - start < BODY_TIMEOUT_S + 11
    healthy(server)


def test_memory_returns_to_baseline_after_the_hostile_table(server: Server) -> None:
    # Warm-up: real work (heatmaps included) and two passes over the table, so that caches,
    # lazily imported code and each thread's malloc arena (the large transient parses run in
    # several threads) are in place before the baseline.
    for _ in range(3):
        body = js({**SMALL, "heatmap": True})
        assert request(server, "POST", "/v1/attention", body)[0] == 200
    for _ in range(2):
        for spec, _ in HOSTILE.values():
            send(server, spec)
    baseline = server.rss()
    for _ in range(3):
        for name, (spec, status) in HOSTILE.items():
            assert_error_answer(name, send(server, spec), status)
    healthy(server)
    grown = server.rss() - baseline
    print(f"server RSS: baseline {baseline / MiB:.1f} MiB, after 3 passes {grown / MiB:+.1f} MiB")
    assert grown < RSS_MARGIN, f"RSS grew by {grown / MiB:.1f} MiB over 3 hostile passes"
