"""What the proxy forwards, from a review of the HTTP/1 hot-path change of 2026-12-08
(each test failed on the code it reviewed; the trailer and Content-Length ones also before it):
route header modifiers cannot add hop-by-hop or framing headers, trailers never become the next
response's headers, a Connection header cannot strip a request's Content-Length, counter cells
are series only once counted.

Driven by tests/http1_fakes.py: a real UpstreamConn and ServerConn over fake transports, no
sockets, no sleeps."""
from __future__ import annotations

import asyncio

from microproxy.core.httproute import HeaderModifier
from microproxy.core.routing import Route
from microproxy.http1 import Exchange, Reject, check_head
from tests.http1_fakes import RecordingTransport, relay


def _route(mod: HeaderModifier) -> Route:
    return Route("r", "default", 0, (), (), response_headers=mod)


# --- regression: ResponseHeaderModifier output is no longer filtered for hop-by-hop headers

def test_response_header_modifier_cannot_add_hop_by_hop_headers() -> None:
    """Before the change the modifier's output went through the hop-by-hop filter; now a
    route that adds Transfer-Encoding (or Keep-Alive, Connection...) gets it forwarded next to
    the upstream's Content-Length: the client is told two framings."""
    mod = HeaderModifier(set=(("x-s", "1"),),
                         add=(("transfer-encoding", "chunked"), ("keep-alive", "timeout=5")))
    [got] = relay([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"], _route(mod))
    assert got == b"HTTP/1.1 200 OK\r\nx-s: 1\r\ncontent-length: 2\r\n\r\nok"


def test_response_header_modifier_header_named_by_connection_is_dropped() -> None:
    """Before the change, headers the upstream's Connection header names were dropped after
    the modifier ran (so also when the modifier adds one); now they are filtered before it."""
    mod = HeaderModifier(add=(("x-a", "added"),))
    [got] = relay([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-a\r\nX-A: 1\r\n\r\nok"],
                        _route(mod))
    assert got == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


# --- pre-existing (same before the change), found while reviewing it

def test_trailers_do_not_leak_into_the_next_response() -> None:
    """httptools reports a chunked response's trailer fields through on_header, after
    on_headers_complete: they stay in the head state and are sent as headers of the next
    response on the connection (another client's, with pooling)."""
    first = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"2\r\nok\r\n0\r\nX-Secret: from-the-first-response\r\n\r\n")
    second = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    got = relay([first, second])
    assert got[0] == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    assert got[1] == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


def test_request_connection_header_cannot_strip_content_length() -> None:
    """``Connection: content-length`` on a request with a body: Exchange.head drops the
    Content-Length, while the body is still forwarded after the head, so the upstream reads
    the body as the next request (request smuggling on a pooled connection). The response
    side keeps its Content-Length since the change; the request side must too (or reject)."""
    headers = [(b"host", b"h"), (b"content-length", b"5"), (b"connection", b"content-length")]
    try:
        cl, chunked, _ = check_head("1.1", headers)
    except Reject:
        return   # refusing such a request is a fix too
    ex = Exchange(b"POST", b"/p", "1.1", headers, b"h", True, chunked, cl)
    assert b"\r\ncontent-length: 5\r\n" in ex.head(b"/p", b"h")


def test_counter_cells_are_series_only_once_counted() -> None:
    """The data path makes counter cells ahead of their first count (an endpoint's pipelined
    counter, a route's failure counter): /metrics shows a series once it has counted, as
    before cells."""
    from microproxy.metrics import Metrics
    m = Metrics()
    piped = m.cell("outbound_http_pipelined_total", 'authority="a:80"')
    req = m.request_cell('authority="a:80"')
    text = m.render().decode()
    assert "outbound_http_pipelined_total{" not in text and "request_total{" not in text
    piped[0] += 1
    req[0] += 2
    text = m.render().decode()
    assert 'outbound_http_pipelined_total{authority="a:80"} 1' in text
    assert 'request_total{authority="a:80"} 2' in text
    assert m.counter("outbound_http_pipelined_total", 'authority="a:80"') == 1


def test_request_trailers_are_not_taken_as_headers() -> None:
    """A chunked request's trailer fields come through on_header after the head: they are
    not added to the exchange's headers (which routing, mirrors and tracing read)."""
    from microproxy.downstream import ServerConn
    from microproxy.metrics import Metrics
    seen: list[Exchange] = []

    class Router:
        def dispatch(self, conn: ServerConn, ex: Exchange) -> None:
            seen.append(ex)

    loop = asyncio.new_event_loop()
    try:
        conn = ServerConn(Router(), Metrics(), set(), loop)   # type: ignore[arg-type]
        conn.connection_made(RecordingTransport())
        conn.data_received(b"POST /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"2\r\nok\r\n0\r\nX-Trailer: t\r\n\r\n")
        [ex] = seen
        assert ex.body_done and [n for n, _ in ex.headers] == [b"host", b"transfer-encoding"]
    finally:
        loop.close()
