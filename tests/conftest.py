"""Fixtures shared by every test module.

- `client`: an in-process TestClient on the app, once per module; the module's APP_SETTINGS
  (Settings fields) configure it. Tests that need their own settings call
  tests.support.http.app_client(tmp_path, **settings).
- `server`: the service started as `make run` starts it (its console script, a free port),
  once per module; the module's SERVER_ENV (ATTN_* variables) and SERVER_ARGS (flags)
  configure it.
- `redis_server`: a real redis-server on a free port, once per module (tests/support/
  redis_server.py); tests that share it keep apart by their own key prefix.
- `store_backend`: where `client` and `server` keep their state: the file store, or, in modules
  that set BOTH_STORES = True, each backend in turn (the redis one on `redis_server`; see
  tests/support/stores.py).

Helpers are plain functions in tests/support (module-level parametrisation needs them too,
which a fixture cannot serve): reference.py holds the q, k, v factory (random_qkv) and the
float64 torch references, http.py the HTTP helpers. Every module imports them one way,
`from tests.support... import ...`, which works under plain `pytest` as under
`python -m pytest` (tests/ is a package, so pytest puts the repository root on sys.path).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from starlette.testclient import TestClient

    from tests.support.http import Server
    from tests.support.redis_server import RedisServer
    from tests.support.stores import StoreBackend


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if getattr(metafunc.module, "BOTH_STORES", False) and "store_backend" in metafunc.fixturenames:
        from tests.support.stores import BACKENDS

        metafunc.parametrize("store_backend", BACKENDS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def store_backend(request: pytest.FixtureRequest) -> StoreBackend:
    from tests.support.stores import FILES, StoreBackend

    if getattr(request, "param", "files") == "files":
        return FILES
    return StoreBackend("redis", request.getfixturevalue("redis_server").url)


@pytest.fixture(scope="module")
def client(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store_backend: StoreBackend,
) -> Iterator[TestClient]:
    from tests.support.http import app_client  # the web layer, only for tests that use it

    settings = {**store_backend.settings(), **getattr(request.module, "APP_SETTINGS", {})}
    with app_client(tmp_path_factory.mktemp("app"), **settings) as c:
        yield c


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    store_backend: StoreBackend,
) -> Iterator[Server]:
    from tests.support.http import running_server

    tmp = tmp_path_factory.mktemp("server")
    env = {
        "ATTN_HEATMAP_DIR": str(tmp / "heatmaps"),
        **store_backend.env(),
        **getattr(request.module, "SERVER_ENV", {}),
    }
    args = getattr(request.module, "SERVER_ARGS", ("--log-level", "warning"))
    with running_server(tmp / "server.log", env, *args) as running:
        yield running


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    from tests.support.redis_server import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as running:
        yield running
