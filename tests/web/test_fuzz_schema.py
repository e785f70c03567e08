"""Property-based fuzzing of every endpoint from the app's own OpenAPI schema (schemathesis).

In-process (ASGI, lifespan run), positive and negative examples: no answer may be a 5xx, and
every answer must conform to the schema (status code documented, content type, body schema).
ATTN_FUZZ_SCALE multiplies the fuzzed examples per operation (`make fuzz` runs 10x); the
default keeps the whole module around a minute.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.python.asgi import ASGIClient, get_client
from schemathesis.specs.openapi import checks as openapi_checks

from service.web.app import create_app
from tests.support.http import app_settings

# Fuzzed examples per operation, after the schema's examples and the coverage phase's cases.
EXAMPLES = 15 * int(os.environ.get("ATTN_FUZZ_SCALE", "1"))

CHECKS = [
    checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.response_headers_conformance,
]


def _app(tmp: Path) -> FastAPI:
    # Small limits: generated tensors stay cheap, and the 413 paths get exercised too.
    return create_app(app_settings(tmp, max_elements=4096, max_weight_elements=1 << 16))


# Loaded at import: schemathesis.pytest.from_fixture breaks on pytest 9 (node._nodeid).
_TMP = Path(tempfile.mkdtemp(prefix="fuzz-schema-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(_TMP))


@pytest.fixture
def asgi_client(tmp_path: Path) -> Iterator[ASGIClient]:
    """One in-process client on a fresh app per operation.

    Fresh: schemathesis ends the app's lifespan after each test, and a lifespan is not
    restartable (it closes the scheduler). One client: not one per request (faster).
    """
    with get_client(_app(tmp_path)) as c:
        yield c


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    # Reproducible in `make test`; `make fuzz` (ATTN_FUZZ_RANDOM=1) explores new examples.
    derandomize=not os.environ.get("ATTN_FUZZ_RANDOM"),
    database=None,
)
def test_every_endpoint(case: schemathesis.Case, asgi_client: ASGIClient) -> None:
    case.call_and_validate(session=asgi_client, checks=CHECKS)
