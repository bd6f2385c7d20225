"""Rendering for the CLI, without I/O: rows in, a string out.

``table(columns, rows)`` lays out an aligned, space-separated table the way kubectl and
linkerd do: upper-case headers, every column as wide as its widest cell, two spaces
between columns, no trailing spaces. Cells are formatted by ``cell()``: ``None`` is ``-``,
booleans are ``true``/``false``, everything else is ``str()``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

GAP = "  "


@dataclass(frozen=True, slots=True)
class Column:
    header: str     # what the table shows, e.g. "PROXY_PID"
    key: str        # the row key the cell comes from, e.g. "proxy_pid"


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    """An aligned table with a header line; ends with a newline. No rows: header only."""
    grid = [[c.header for c in columns]]
    grid += [[cell(row.get(c.key)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = []
    for line in grid:
        padded = [text.ljust(width) for text, width in zip(line, widths)]
        lines.append(GAP.join(padded).rstrip())
    return "\n".join(lines) + "\n"


WORKLOAD_COLUMNS = (
    Column("NAME", "name"),
    Column("NAMESPACE", "namespace"),
    Column("SERVICE", "service"),
    Column("INSTANCE", "instance"),
    Column("READY", "ready"),
    Column("PID", "pid"),
    Column("PROXY_PID", "proxy_pid"),
    Column("APP_PORT", "app_port"),
    Column("INBOUND", "inbound_port"),
    Column("OUTBOUND", "outbound_port"),
    Column("ADMIN", "admin_port"),
    Column("IDENTITY", "identity"),
)


def workloads(rows: Sequence[Mapping[str, Any]]) -> str:
    """The `mesh ps` table."""
    return table(WORKLOAD_COLUMNS, rows)
