"""Helpers of the HTTP tests: an in-process app with test settings, the real server started on
a free port (the fixtures in tests/conftest.py use both; so does `make load`), tensor encoders,
problem checks."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from starlette.exceptions import StarletteDeprecationWarning

from service.web.app import create_app
from service.web.settings import Settings

with warnings.catch_warnings():
    # Starlette prefers httpx2 for its TestClient; httpx still works.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PROBLEM = "application/problem+json"


def app_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(**{"heatmap_dir": tmp_path / "heatmaps", **overrides})


@contextmanager
def app_client(
    tmp_path: Path, *, raise_server_exceptions: bool = True, **overrides: Any
) -> Iterator[TestClient]:
    """A TestClient on a fresh app (lifespan run) whose heatmaps live under tmp_path.

    raise_server_exceptions=False: a bug's 500 is answered as a client would see it, instead of
    the exception being raised in the test (Starlette re-raises it after answering).
    """
    app = create_app(app_settings(tmp_path, **overrides))
    with TestClient(app, raise_server_exceptions=raise_server_exceptions) as c:
        yield c


def b64(arr: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    """{dtype, shape, b64} of arr (bfloat16: the top 16 bits of float32, truncated)."""
    if dtype == "bfloat16":
        bits = (np.ascontiguousarray(arr, dtype="<f4").view("<u4") >> 16).astype("<u2")
        raw = bits.tobytes()
    else:
        raw = np.ascontiguousarray(arr, dtype=np.dtype(dtype or arr.dtype.name).newbyteorder("<"))
        raw = raw.tobytes()
    return {
        "dtype": dtype or arr.dtype.name,
        "shape": list(arr.shape),
        "b64": base64.b64encode(raw).decode(),
    }


def data(arr: np.ndarray, dtype: str | None = None) -> dict[str, Any]:
    return {
        "dtype": dtype or arr.dtype.name,
        "shape": list(arr.shape),
        "data": arr.ravel().tolist(),
    }


def bfloat16_round(arr: np.ndarray) -> np.ndarray:
    """What a bfloat16 b64 tensor made by b64() decodes to (truncated float32)."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32)


def decode(value: Any) -> np.ndarray:
    """A response tensor: nested lists (null = NaN) or {dtype, shape, b64}."""
    if isinstance(value, dict):
        raw = base64.b64decode(value["b64"])
        return np.frombuffer(raw, dtype=np.dtype(value["dtype"]).newbyteorder("<")).reshape(
            value["shape"]
        )
    return np.array(value, dtype=np.float64)


def post(c: TestClient, path: str, body: dict[str, Any]) -> Any:
    """POST a body serialised by orjson (numpy arrays as nested lists)."""
    return c.post(
        path,
        content=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        headers={"content-type": "application/json"},
    )


def assert_problem(response: Any, status: int, loc: list[Any] | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status (and an error at loc)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert {"type", "title", "status", "detail"} <= set(body)
    assert body["detail"]
    if loc is not None:
        locs = [e["loc"] for e in body["errors"]]
        assert loc in locs, (loc, body)
    return body


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script() -> str:
    """The `attention-service` script installed next to this interpreter (the venv's)."""
    script = Path(sys.executable).with_name("attention-service")
    if not script.exists():
        raise RuntimeError("the attention-service console script is not installed (make build)")
    return str(script)


@dataclass
class Server:
    """A running `attention-service` process: its port, its log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient takes it."""
        return f"127.0.0.1:{self.port}"

    def rss(self) -> int:
        """Resident set size in bytes (VmRSS of /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")


@contextmanager
def running_server(
    log: Path,
    env: dict[str, str],
    *args: str,
    command: tuple[str, ...] = (),
    ready_timeout_s: float = 120,
) -> Iterator[Server]:
    """`attention-service` started as `make run` starts it, on a free port, with `env` over the
    environment and `args` after --host/--port; yields it once /readyz answers. `command`
    comes first (("ray",): the Ray Serve launcher).

    Its output goes to the file `log`, never a pipe: a full pipe would block the server."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [console_script(), *command, "--host", "127.0.0.1", "--port", str(port), *args],
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not ready within {ready_timeout_s:.0f} s: {log.read_text()}"
                )
            time.sleep(0.1)
        yield Server(proc, port, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
