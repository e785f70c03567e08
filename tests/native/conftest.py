"""The `isa` fixture of the native tests: a test taking it runs once per instruction set the
extension is built for, and is skipped, with the reason, for one this CPU cannot run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.native import ISAS, REQUIRES, isa_set


def _runnable(name: str) -> Any:
    reason = f"the {name} kernels are built, but this CPU lacks {', '.join(sorted(REQUIRES[name]))}"
    return pytest.param(name, marks=pytest.mark.skipif(name not in ISAS, reason=reason))


@pytest.fixture(params=[_runnable(name) for name in REQUIRES])
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    with isa_set(request.param):
        yield request.param
