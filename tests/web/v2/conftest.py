"""Clients of the /v2 tests, on the module's real server (the `server` fixture of
tests/conftest.py): tritonclient's HTTP client, and a plain httpx client for raw requests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import tritonclient.http as triton

from tests.support.http import Server


@pytest.fixture(scope="module")
def tc(server: Server) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
