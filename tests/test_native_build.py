"""The compiled extension's build facts: its version comes from the package metadata."""

from __future__ import annotations

import importlib.metadata

from service import _native


def test_version_is_the_package_version() -> None:
    # pyproject.toml -> scikit-build-core -> CMake -> a compile definition -> __version__.
    expected = importlib.metadata.version("attention-service")
    assert _native.__version__ == expected
    assert _native.version() == expected
