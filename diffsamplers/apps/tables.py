"""The one table writer: Markdown tables and JSON reports of the jobs and scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "resumed_report", "versions", "write_json"]


def markdown_table(
    rows: Mapping[str, Mapping[Any, Mapping[str, float]]],
    columns: Sequence[Any],
    metric: str,
    row_header: str = "method",
    column_label: str = "{} steps",
    fmt: str = "{:.3e}",
) -> str:
    """``rows[name][column][metric]`` as a Markdown table, one line per row name."""
    lines = [
        f"| {row_header} | " + " | ".join(column_label.format(c) for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name, by_column in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(by_column[c][metric]) for c in columns) + " |")
    return "\n".join(lines)


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write a report as indented JSON (creating the folder), returning the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def versions() -> dict[str, str]:
    """The versions a report records: diffsamplers, diffusers, torch and Python."""
    import platform

    import diffusers
    import torch

    from .. import __version__

    return {
        "diffsamplers": __version__,
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def resumed_report(path: str | Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The report at ``path`` if an earlier run with the same ``settings`` wrote it (an interrupted sweep resumes
    from its rows), else a new report ``{"settings": …, "rows": []}``."""
    path = Path(path)
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("settings") == dict(settings):
            return old
    return {"settings": dict(settings), "rows": []}
