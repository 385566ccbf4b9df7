"""Markdown tables of the comparison scripts (rows of methods × columns of step counts, one metric)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["markdown_table"]


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
