"""cli/render.py: rows in, aligned text out (no I/O)."""
from __future__ import annotations

from typing import Any

import pytest

from cli import render
from cli.render import Column


@pytest.mark.parametrize(("value", "text"), [
    (None, "-"),
    ("", "-"),
    (True, "true"),
    (False, "false"),
    (0, "0"),
    (7002, "7002"),
    ("books", "books"),
])
def test_cell(value: object, text: str) -> None:
    assert render.cell(value) == text


def test_table_aligns_columns_with_two_spaces_and_no_trailing_blanks() -> None:
    cols = [Column("NAME", "name"), Column("PORT", "port"), Column("ID", "id")]
    rows: list[dict[str, Any]] = [{"name": "authors", "port": 7001, "id": "a"},
                                  {"name": "web", "port": None, "id": "w"}]
    assert render.table(cols, rows) == (
        "NAME     PORT  ID\n"
        "authors  7001  a\n"
        "web      -     w\n"
    )


def test_table_without_rows_is_the_header() -> None:
    assert render.table([Column("NAME", "name"), Column("READY", "ready")], []) == "NAME  READY\n"


def test_cells_wider_than_headers_widen_the_column() -> None:
    out = render.table([Column("A", "a"), Column("B", "b")], [{"a": "xxxxx", "b": 1}])
    assert out.splitlines() == ["A      B", "xxxxx  1"]


def test_missing_keys_render_as_dash() -> None:
    assert render.table([Column("A", "a"), Column("B", "b")], [{}]).splitlines()[1] == "-  -"


def test_workloads_table_golden() -> None:
    rows = [
        {"name": "books", "namespace": "default", "service": "books", "instance": "books-1a2b", "ready": True,
         "pid": 101, "proxy_pid": 100, "app_port": 7002, "inbound_port": 41001,
         "outbound_port": 41002, "admin_port": 41003,
         "identity": "books.default.serviceaccount.identity.cluster.local"},
        {"name": "client", "namespace": "default", "instance": "client-ffff", "ready": "dead",
         "pid": 201, "proxy_pid": 200, "app_port": None, "inbound_port": 42001,
         "outbound_port": 42002, "admin_port": 42003,
         "identity": "client.default.serviceaccount.identity.cluster.local"},
    ]
    assert render.workloads(rows) == (
        "NAME    NAMESPACE  SERVICE  INSTANCE     READY  PID  PROXY_PID  APP_PORT  INBOUND  OUTBOUND  ADMIN  IDENTITY\n"
        "books   default    books    books-1a2b   true   101  100        7002      41001    41002     41003  "
        "books.default.serviceaccount.identity.cluster.local\n"
        "client  default    -        client-ffff  dead   201  200        -         42001    42002     42003  "
        "client.default.serviceaccount.identity.cluster.local\n"
    )


def test_workload_columns_are_the_documented_ones() -> None:
    assert [c.header for c in render.WORKLOAD_COLUMNS] == [
        "NAME", "NAMESPACE", "SERVICE", "INSTANCE", "READY", "PID", "PROXY_PID", "APP_PORT",
        "INBOUND", "OUTBOUND", "ADMIN", "IDENTITY"]
