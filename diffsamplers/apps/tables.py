"""The one table writer: Markdown tables and JSON reports of the jobs and scripts."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "write_json"]


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
