"""The README's story, checked on the real demo: `mesh demo` with real traffic, then
`mesh stat` shows authors (the service that fails on purpose) below 100 %, `mesh top` finds
the failing path, `mesh edges` shows the topology over mTLS and `mesh tap` sees the 500s.

(tests/test_observe_e2e.py pins the views' formats with golden files and a small mesh; this
file runs them against the demo itself.)
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import local
from identity.store import MeshHome

from .test_observe_e2e import mesh, ok, sweep, wait


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("demo") / "mesh-home"
    try:
        # The demo as users run it: authors fails ~5 % of requests, traffic sends ~4 rps.
        r = mesh(root, "demo", timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        yield root
    finally:
        local.down(MeshHome(root), timeout=10)
        sweep(root)


def stat_rows(home: Path) -> dict[str, Any]:
    doc = json.loads(ok(home, "stat", "deploy", "-t", "1m", "-o", "json"))
    rows = doc if isinstance(doc, list) else doc.get("rows", doc.get("items", []))
    return {row["name"]: row for row in rows}


def test_stat_shows_authors_below_100_percent(demo: Path) -> None:
    def failing() -> dict[str, Any] | None:
        rows = stat_rows(demo)
        a = rows.get("authors")
        if not a or not a.get("success") or a["success"] >= 1.0 or not a.get("requests", 1):
            return None
        return rows
    rows = wait(failing, 90, "authors to show failures in mesh stat")
    assert rows["authors"]["meshed"] == "2/2"
    assert {"web", "books", "authors", "traffic"} <= set(rows)
    table = ok(demo, "stat", "deploy")
    assert table.splitlines()[0].split()[:3] == ["NAME", "MESHED", "SUCCESS"]


def test_top_finds_the_failing_path(demo: Path) -> None:
    def rows() -> list[list[str]] | None:
        out = ok(demo, "top", "--duration", "3").splitlines()[1:]
        cols = [line.split() for line in out]
        hit = [c for c in cols if c[:4] == ["books", "authors", "GET", "/authors"] or
               c[:4] == ["web", "authors", "GET", "/authors"]]
        return cols if any(c[-1] != "100.00%" for c in hit) else None
    cols = wait(rows, 60, "mesh top to show a failing /authors path")
    assert any(c[:2] == ["traffic", "web"] for c in cols)


def test_edges_and_tap_on_the_demo(demo: Path) -> None:
    edges = {tuple(line.split()[:2]) for line in ok(demo, "edges").splitlines()[1:]}
    assert {("traffic", "web"), ("web", "books"), ("web", "authors"), ("books", "authors")} <= edges
    assert all(line.rstrip().endswith("√") for line in ok(demo, "edges").splitlines()[1:])

    def a_500() -> list[str] | None:
        lines = ok(demo, "tap", "deploy/authors", "--max-events", "60").splitlines()
        return lines if any(":status=500" in line for line in lines) else None
    lines = wait(a_500, 60, "mesh tap to show a 500 from authors")
    assert {line.split()[0] for line in lines} <= {"req", "rsp", "end"}
