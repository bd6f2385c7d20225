"""`mesh tap` / `top` without I/O: event lines as Linkerd prints them, the top table and
its 80x24 screen, pinned by golden files (tests/golden/)."""
from __future__ import annotations

from typing import Any

import pytest

from cli import tap, top
from tests.golden_files import assert_golden


def peer(workload: str | None, addr: str) -> dict[str, Any]:
    ident = f"{workload}.default.serviceaccount.identity.cluster.local" if workload else None
    return {"workload": workload, "namespace": "default" if workload else None, "identity": ident, "addr": addr}


def req(rid: str, direction: str, src: str | None, dst: str | None, path: str = "/", tls: bool = True,
        authority: str = "books.default:7002", method: str = "GET") -> dict[str, Any]:
    return {"type": "req", "id": rid, "direction": direction, "ts": 1700000000.0,
            "src": peer(src, "127.0.0.1:50312"), "dst": peer(dst, "127.0.0.1:4143"), "tls": tls,
            "method": method, "authority": authority, "path": path}


def rsp(rid: str, status: int = 200, latency_us: int = 2331) -> dict[str, Any]:
    return {"type": "rsp", "id": rid, "status": status, "latency_us": latency_us}


def end(rid: str, duration_us: int = 2410, size: int = 231, error: str | None = None,
        grpc: int | None = None) -> dict[str, Any]:
    return {"type": "end", "id": rid, "duration_us": duration_us, "response_bytes": size,
            "grpc_status": grpc, "error": error}


STREAM = [  # (proxy number, event): web's proxy (1) calls books, books' proxy (2) serves it
    (1, req("web-1:0", "outbound", "web", "books", "/books")),
    (2, req("books-1:7", "inbound", "web", "books", "/books")),
    (2, rsp("books-1:7", 200, 1200)),
    (2, end("books-1:7", 1300, 231)),
    (1, rsp("web-1:0", 200, 2331)),
    (1, end("web-1:0", 2410, 231)),
    (1, req("web-1:1", "outbound", "web", "authors", "/authors", authority="authors.default:7001")),
    (1, rsp("web-1:1", 500, 812)),
    (1, end("web-1:1", 900, 60, error="UF")),
    (2, req("books-1:8", "inbound", None, "books", "/books", tls=False)),
    (2, rsp("books-1:8", 200, 40)),
    (2, end("books-1:8", 55, 231, grpc=0)),
    (3, rsp("gone:1", 200, 1)),          # its req was never seen
]


def test_tap_lines_as_linkerd_prints_them() -> None:
    fmt = tap.TapFormatter()
    lines = [fmt.line(no, ev) for no, ev in STREAM]
    assert lines[0] == ("req id=1:0 proxy=out src=127.0.0.1:50312 dst=127.0.0.1:4143 tls=true "
                        ":method=GET :authority=books.default:7002 :path=/books")
    assert lines[1].startswith("req id=2:7 proxy=in  src=")     # `in ` aligns with `out`
    assert lines[5] == ("end id=1:0 proxy=out src=127.0.0.1:50312 dst=127.0.0.1:4143 tls=true "
                        "duration=2410µs response-length=231B")
    assert fmt.pending == {}   # every finished request was forgotten
    assert_golden("tap.txt", "\n".join(lines) + "\n")


def test_tap_wide_and_json() -> None:
    fmt = tap.TapFormatter(wide=True)
    assert_golden("tap_wide.txt", "\n".join(fmt.line(no, ev) for no, ev in STREAM) + "\n")
    rec = {"instance": "web-1"}
    assert_golden("tap.jsonl", "\n".join(tap.json_line(rec, ev) for _, ev in STREAM[:3]) + "\n")


def test_tap_remembers_a_bounded_number_of_requests() -> None:
    fmt = tap.TapFormatter(max_pending=2)
    for i in range(5):
        fmt.line(1, req(f"p:{i}", "inbound", "web", "books"))
    assert [k[1] for k in fmt.pending] == ["p:3", "p:4"]
    assert "proxy=??? " in fmt.line(1, end("p:0"))


def test_tap_query_path() -> None:
    assert tap.TapParams().query_path() == "/tap?max_rps=100"
    assert tap.TapParams(2.5, "get", "/a b", "books.default:7002").query_path() == \
        "/tap?max_rps=2.5&method=get&path=%2Fa+b&authority=books.default%3A7002"


@pytest.mark.parametrize(("us", "text"), [
    (0, "0s"), (1, "1µs"), (999, "999µs"), (1000, "1ms"), (1499, "1ms"), (1500, "2ms"),
    (999_499, "999ms"), (999_500, "1s"), (1_500_000, "2s"), (65_000_000, "1m5s"), (3_600_000_000, "1h0m0s"),
])
def test_durations_print_like_go(us: int, text: str) -> None:
    assert top.format_duration(us) == text


def test_top_counts_each_request_once() -> None:
    """Both proxies of web -> books are tapped: the inbound side counts, the outbound is a
    duplicate. web -> authors (not tapped) counts from web's outbound side."""
    table = top.TopTable(frozenset({("default", "web"), ("default", "books")}))
    for no, ev in STREAM:
        table.feed(no, ev)
    rows = [(r.source, r.destination, r.path, r.count, r.successes, r.failures) for r in table.sorted_rows()]
    assert rows == [("web", "books", "/books", 1, 1, 0), ("web", "authors", "/authors", 1, 0, 1),
                    ("127.0.0.1", "books", "/books", 1, 1, 0)]
    assert table.seen == 3 and not table.pending


def busy_table() -> top.TopTable:
    table = top.TopTable(frozenset({("default", n) for n in ("traffic", "web", "books", "authors")}))
    n = 0

    def call(src: str, dst: str, path: str, times: int, fail_every: int, base_us: int) -> None:
        nonlocal n
        for i in range(times):
            rid = f"x:{n}"
            n += 1
            table.feed(1, req(rid, "inbound", src, dst, path))
            status = 500 if fail_every and i % fail_every == fail_every - 1 else 200
            table.feed(1, rsp(rid, status))
            table.feed(1, end(rid, base_us + 37 * i))
    call("traffic", "web", "/", 40, 10, 7_000)
    call("web", "books", "/books", 41, 0, 2_100)
    call("web", "authors", "/authors", 41, 20, 600)
    call("books", "authors", "/authors", 42, 20, 580)
    call("web", "books", "/books?page=2&sort=title&with-a-very-long-query=yes", 3, 0, 1_300_000)
    return table


def test_top_screen_fits_80x24() -> None:
    table = busy_table()
    screen = top.render_screen(table, 80, 24, top.status_line("ns/default", 5, table, 100, 0))
    assert len(screen) <= 23 and all(len(line) <= 80 for line in screen)
    assert screen[3].split() == ["Source", "Destination", "Method", "Path", "Count", "Best", "Worst",
                                 "Last", "Success", "Rate"]
    assert screen[4].split()[:5] == ["books", "authors", "GET", "/authors", "42"]   # busiest first
    assert_golden("top_80x24.txt", "\n".join(screen) + "\n")


def test_top_screen_shrinks_path_then_names_and_crops_rows() -> None:
    table = busy_table()
    screen = top.render_screen(table, 60, 7, "status")
    assert len(screen) == 6 and all(len(line) <= 60 for line in screen)
    assert_golden("top_narrow.txt", "\n".join(screen) + "\n")
