"""The package version, read from the package metadata (pyproject.toml is its one source).

The extension is built with the same string (scikit-build-core passes it to CMake), so
`service._native.__version__` agrees; /readyz, the OpenAPI document and /v2's server metadata
report this one.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "attention-service"

try:
    VERSION = version(DISTRIBUTION)
except PackageNotFoundError:  # sources on sys.path without an install (a thin client, say)
    VERSION = "0+unknown"
