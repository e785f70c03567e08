"""The machine a benchmark ran on, written beside its figures (they compare only on one machine)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


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


def report(title: str, *blocks: str) -> str:
    """A report: `# title`, then the blocks (paragraphs, tables) one blank line apart."""
    return "\n\n".join([f"# {title}", *blocks]) + "\n"


def table(columns: Sequence[str], align: str, rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table of already formatted cells; `align` has a letter a column: l for text,
    r for figures (right-aligned)."""
    if len(align) != len(columns):
        raise ValueError(f"align {align!r} has {len(align)} letters for {len(columns)} columns")
    rule = {"l": "---", "r": "---:"}
    lines = [columns, [rule[a] for a in align], *rows]
    return "\n".join("| " + " | ".join(map(str, cells)) + " |" for cells in lines)


def write_results(directory: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """<name>.json (the figures) and <name>.md (the table) in `directory`; the table printed."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (directory / f"{name}.md").write_text(markdown)
    print(markdown)
