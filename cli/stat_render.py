"""Rendering for `mesh stat` and `mesh edges`, without I/O: rows in, text out.

Linkerd's layout (``viz/cmd/stat.go``, ``edges.go``): a tabwriter with three spaces of
padding, names left-aligned, numbers right-aligned; ``-`` for a resource without traffic;
``-o json`` with Linkerd's field names (``success`` is a ratio, null without traffic).
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .stat import StatRow
from .targets import AUTHORITY, CANONICAL, POD


def round_ms(value: float | None) -> int | None:
    """Linkerd's latency cells are whole milliseconds, rounded half away from zero."""
    return None if value is None else math.floor(value + 0.5)


PADDING = 3     # linkerd's tabwriter padding


def tabulate(lines: Sequence[Sequence[str]], left: int) -> str:
    """Linkerd's tabwriter layout: the first ``left`` columns left-aligned, the rest
    right-aligned, three spaces between columns, no trailing blanks."""
    if not lines:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for line in lines:
        cells = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        out.append((" " * PADDING).join(cells).rstrip())
    return "\n".join(out) + "\n"


def _fmt_row(r: StatRow, wide: bool) -> list[str]:
    if not r.has_data:
        cells = ["-"] * 6
        return cells + ["-", "-"] if wide and r.kind != AUTHORITY else cells
    sr = r.success_rate
    cells = [f"{sr * 100:.2f}%" if sr is not None else "-", f"{r.rps:.1f}rps"]
    cells += [f"{round_ms(v)}ms" if v is not None else "-" for v in (r.p50, r.p95, r.p99)]
    cells.append("-" if r.tcp_conn is None else str(r.tcp_conn))
    if wide and r.kind != AUTHORITY:
        cells += ["-" if v is None else f"{v:.1f}B/s" for v in (r.read_rate, r.write_rate)]
    return cells


def render_table(rows: Sequence[StatRow], kind: str, wide: bool = False,
                 all_namespaces: bool = False) -> str:
    """The `mesh stat` table, as `linkerd viz stat` prints it."""
    header = ["NAME"] + (["STATUS"] if kind == POD else []) + ["MESHED", "SUCCESS", "RPS",
                                                               "LATENCY_P50", "LATENCY_P95",
                                                               "LATENCY_P99", "TCP_CONN"]
    if wide and kind != AUTHORITY:
        header += ["READ_BYTES/SEC", "WRITE_BYTES/SEC"]
    left = 1
    if all_namespaces:
        header.insert(0, "NAMESPACE")
        left = 2
    lines = [header]
    for r in rows:
        line = ([r.namespace] if all_namespaces else []) + [r.name]
        line += ([r.status or "-"] if kind == POD else []) + [r.meshed] + _fmt_row(r, wide)
        lines.append(line)
    return tabulate(lines, left)


def json_rows(rows: Sequence[StatRow]) -> list[dict[str, Any]]:
    """Linkerd's `-o json` objects (``success`` is a ratio; null without traffic)."""
    out = []
    for r in rows:
        obj: dict[str, Any] = {"namespace": r.namespace, "kind": CANONICAL[r.kind], "name": r.name}
        if r.kind != AUTHORITY:
            obj["meshed"] = r.meshed
        if r.kind == POD:
            obj["status"] = r.status
        data = r.has_data
        sr = r.success_rate
        obj["success"] = round(sr, 6) if data and sr is not None else None
        obj["rps"] = round(r.rps, 6) if data else None
        for q, v in (("p50", r.p50), ("p95", r.p95), ("p99", r.p99)):
            obj[f"latency_ms_{q}"] = round_ms(v) if data else None
        if r.kind != AUTHORITY and r.tcp_conn is not None and data:
            obj["tcp_open_connections"] = r.tcp_conn
            obj["tcp_read_bytes_rate"] = round(r.read_rate or 0.0, 6)
            obj["tcp_write_bytes_rate"] = round(r.write_rate or 0.0, 6)
        out.append(obj)
    return out


def render_json(rows: Sequence[StatRow]) -> str:
    return json.dumps(json_rows(rows), indent=2) + "\n"
