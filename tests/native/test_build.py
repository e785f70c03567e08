"""The compiled extension's build facts: its version comes from the package metadata, and its
type stub (service/_native.pyi) describes what it really holds."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

from service import _native


def test_version_is_the_package_version() -> None:
    # pyproject.toml -> scikit-build-core -> CMake -> a compile definition -> __version__.
    expected = importlib.metadata.version("attention-service")
    assert _native.__version__ == expected
    assert _native.version() == expected


def test_the_type_stub_matches_the_extension(tmp_path: Path) -> None:
    # mypy's stubtest imports the module and compares every name the stub declares with it (and
    # reports names the module has that the stub lacks). pybind11 classes have their own
    # metaclass, which a stub cannot name.
    allowlist = tmp_path / "allowlist"
    allowlist.write_text("service._native.CancelFlag\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "service._native", "--allowlist", str(allowlist)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
