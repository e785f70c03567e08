"""The machine a benchmark ran on, written beside its figures (they compare only on one machine)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe(**facts: str) -> dict[str, str]:
    """CPU model and cores, then `facts` (library versions, settings), then Python's version."""
    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        **facts,
        "python": platform.python_version(),
    }
