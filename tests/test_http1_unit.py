"""Pure parts of the proxy's HTTP/1 layer: head checks, strict numbers, proxy-made errors,
authority normalisation and request-target splitting. Table-driven; no sockets."""
from __future__ import annotations

import re

import pytest

from microproxy.http1 import ERROR_HEADER, MAX_HEADERS, Reject, check_head, error_response, parse_digits
from microproxy.outbound import normalize_authority, split_target
from tests.http1_fakes import get, relay

H = (b"host", b"books.default:7002")


# --- check_head: accepted heads -> (content_length, chunked, host)

ACCEPT = [
    ("plain GET", "1.1", [H], (None, False, b"books.default:7002")),
    ("HTTP/1.0 without host", "1.0", [], (None, False, None)),
    ("HTTP/1.0 with host", "1.0", [H], (None, False, b"books.default:7002")),
    ("content-length", "1.1", [H, (b"content-length", b"5")], (5, False, H[1])),
    ("content-length 0", "1.1", [H, (b"content-length", b"0")], (0, False, H[1])),
    ("content-length 19 digits", "1.1", [H, (b"content-length", b"9" * 19)], (int("9" * 19), False, H[1])),
    ("equal repeated content-length", "1.1", [H, (b"content-length", b"5"), (b"content-length", b"5")],
     (5, False, H[1])),
    ("equal list content-length", "1.1", [H, (b"content-length", b"5, 5")], (5, False, H[1])),
    ("chunked", "1.1", [H, (b"transfer-encoding", b"chunked")], (None, True, H[1])),
    ("Chunked (case)", "1.1", [H, (b"transfer-encoding", b"Chunked")], (None, True, H[1])),
    ("host without port", "1.1", [(b"host", b"books")], (None, False, b"books")),
    ("host ipv4", "1.1", [(b"host", b"127.0.0.1:80")], (None, False, b"127.0.0.1:80")),
    ("host ipv6", "1.1", [(b"host", b"[::1]:8080")], (None, False, b"[::1]:8080")),
    ("host padded", "1.1", [(b"host", b" books ")], (None, False, b"books")),
    ("tab in value", "1.1", [H, (b"x-a", b"a\tb")], (None, False, H[1])),
    ("obs-text in value", "1.1", [H, (b"x-a", b"caf\xc3\xa9")], (None, False, H[1])),
    ("tchar name", "1.1", [H, (b"x-!#$%&'*+-.^_`|~09az", b"v")], (None, False, H[1])),
    ("empty value", "1.1", [H, (b"x-empty", b"")], (None, False, H[1])),
    (f"{MAX_HEADERS} headers", "1.1", [H] + [(b"x-%d" % i, b"v") for i in range(MAX_HEADERS - 1)],
     (None, False, H[1])),
]


@pytest.mark.parametrize("version,headers,want", [a[1:] for a in ACCEPT], ids=[a[0] for a in ACCEPT])
def test_check_head_accepts(version: str, headers: list[tuple[bytes, bytes]], want: tuple) -> None:
    assert check_head(version, headers) == want


# --- check_head: rejects -> status (REFERENCE-hardening.md §3; numbers are the § items)

REJECT = [
    ("1 CL+TE", "1.1", [H, (b"content-length", b"5"), (b"transfer-encoding", b"chunked")], 400),
    ("1 TE+CL", "1.1", [H, (b"transfer-encoding", b"chunked"), (b"content-length", b"0")], 400),
    ("2 differing CL headers", "1.1", [H, (b"content-length", b"5"), (b"content-length", b"6")], 400),
    ("2 differing CL list", "1.1", [H, (b"content-length", b"5, 6")], 400),
    ("3 CL -1", "1.1", [H, (b"content-length", b"-1")], 400),
    ("3 CL +5", "1.1", [H, (b"content-length", b"+5")], 400),
    ("3 CL 1_0", "1.1", [H, (b"content-length", b"1_0")], 400),
    ("3 CL 0x5", "1.1", [H, (b"content-length", b"0x5")], 400),
    ("3 CL '5 5'", "1.1", [H, (b"content-length", b"5 5")], 400),
    ("3 CL empty", "1.1", [H, (b"content-length", b"")], 400),
    ("3 CL empty list member", "1.1", [H, (b"content-length", b"5,")], 400),
    ("3 CL 20 digits", "1.1", [H, (b"content-length", b"1" * 20)], 400),
    ("3 CL arabic-indic digits", "1.1", [H, (b"content-length", "١٢".encode())], 400),
    ("3 CL fullwidth digit", "1.1", [H, (b"content-length", "５".encode())], 400),
    ("3 CL 5.0", "1.1", [H, (b"content-length", b"5.0")], 400),
    ("5 TE ,chunked", "1.1", [H, (b"transfer-encoding", b",chunked")], 501),
    ("5 TE identity", "1.1", [H, (b"transfer-encoding", b"identity")], 501),
    ("5 TE chunked not last", "1.1", [H, (b"transfer-encoding", b"chunked, gzip")], 501),
    ("5 TE gzip, chunked", "1.1", [H, (b"transfer-encoding", b"gzip, chunked")], 501),
    ("5 TE chunked twice", "1.1", [H, (b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], 501),
    ("5 TE empty", "1.1", [H, (b"transfer-encoding", b"")], 501),
    ("6 TE in HTTP/1.0", "1.0", [(b"transfer-encoding", b"chunked")], 400),
    ("9 NUL in value", "1.1", [H, (b"x-a", b"a\x00b")], 400),
    ("9 bare CR in value", "1.1", [H, (b"x-a", b"a\rb")], 400),
    ("9 bare LF in value", "1.1", [H, (b"x-a", b"a\nb")], 400),
    ("9 DEL in value", "1.1", [H, (b"x-a", b"a\x7fb")], 400),
    ("9 ESC in value", "1.1", [H, (b"x-a", b"a\x1bb")], 400),
    ("11 space in name", "1.1", [H, (b"x a", b"v")], 400),
    ("11 name with trailing space (space before colon)", "1.1", [H, (b"x-a ", b"v")], 400),
    ("11 colon in name", "1.1", [H, (b"x:a", b"v")], 400),
    ("11 0x80 in name", "1.1", [H, (b"x-\x80", b"v")], 400),
    ("11 empty name", "1.1", [H, (b"", b"v")], 400),
    ("11 name ending in LF", "1.1", [H, (b"x-a\n", b"v")], 400),
    ("13 missing host", "1.1", [], 400),
    ("13 duplicate host", "1.1", [H, H], 400),
    ("13 empty host", "1.1", [(b"host", b"")], 400),
    ("13 host with path", "1.1", [(b"host", b"books/x")], 400),
    ("13 host with userinfo", "1.1", [(b"host", b"evil@books")], 400),
    ("13 host with empty port", "1.1", [(b"host", b"books:")], 400),
    ("13 host with 6-digit port", "1.1", [(b"host", b"books:700200")], 400),
    ("13 host with space", "1.1", [(b"host", b"bo oks")], 400),
    ("13 host ending in LF", "1.1", [(b"host", b"books\n")], 400),
    ("14 HTTP/1.2", "1.2", [H], 400),
    ("14 HTTP/0.9", "0.9", [H], 400),
    ("14 HTTP/2.0", "2.0", [H], 505),
    ("14 HTTP/3.0", "3.0", [H], 505),
]


@pytest.mark.parametrize("version,headers,status", [r[1:] for r in REJECT], ids=[r[0] for r in REJECT])
def test_check_head_rejects(version: str, headers: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(Reject) as ei:
        check_head(version, headers)
    assert ei.value.status == status
    assert ei.value.reason


# --- parse_digits: strict ASCII digits only (int() accepts far more)

DIGITS = [
    (b"0", 0), (b"7", 7), (b"007", 7), (b"123456", 123456), (b"9" * 19, int("9" * 19)),
    (b"", None), (b"9" * 20, None), (b"+1", None), (b"-1", None), (b" 1", None), (b"1 ", None),
    (b"1_0", None), (b"0x1f", None), (b"1f", None), (b"1.0", None), (b"1e3", None),
    ("١٢".encode(), None), ("５".encode(), None), (b"12\n", None), (b"\n12", None), (b"12\r\n", None),
    (b"1\x002", None),
]


@pytest.mark.parametrize("raw,want", DIGITS, ids=[repr(d[0]) for d in DIGITS])
def test_parse_digits(raw: bytes, want: int | None) -> None:
    assert parse_digits(raw) == want


# --- error_response: a complete, well-framed proxy-made response

def _parse(resp: bytes) -> tuple[str, dict[bytes, bytes], bytes]:
    head, sep, body = resp.partition(b"\r\n\r\n")
    assert sep, resp
    status, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, colon, value = line.partition(b": ")
        assert colon and re.fullmatch(rb"[a-z0-9-]+", name), line
        assert name not in headers, f"duplicate {name!r}"
        headers[name] = value
    return status.decode(), headers, body


ERRORS = [
    (400, "malformed request", True, "HTTP/1.1 400 Bad Request"),
    (431, "request head too large", True, "HTTP/1.1 431 Request Header Fields Too Large"),
    (501, "unsupported transfer-encoding", True, "HTTP/1.1 501 Not Implemented"),
    (502, "upstream connection lost", False, "HTTP/1.1 502 Bad Gateway"),
    (503, "unknown service books.default:80", False, "HTTP/1.1 503 Service Unavailable"),
    (504, "no endpoints", True, "HTTP/1.1 504 Gateway Timeout"),
    (505, "unsupported HTTP version 2.0", True, "HTTP/1.1 505 HTTP Version Not Supported"),
    (599, "odd", False, "HTTP/1.1 599 Error"),
]


@pytest.mark.parametrize("status,reason,close,line", ERRORS, ids=[str(e[0]) for e in ERRORS])
def test_error_response(status: int, reason: str, close: bool, line: str) -> None:
    got, headers, body = _parse(error_response(status, reason, close))
    assert got == line
    assert headers[ERROR_HEADER] == reason.encode()
    assert int(headers[b"content-length"]) == len(body)
    assert body == reason.encode() + b"\n"
    assert (headers.get(b"connection") == b"close") == close


@pytest.mark.parametrize("reason", ["a\r\nx-evil: 1", "a\nx-evil: 1", "a\rb", "caf\u00e9 \u2603"])
def test_error_response_reason_cannot_break_the_head(reason: str) -> None:
    """The reason goes into a header: CR/LF must not split it, non-ASCII must not crash."""
    got, headers, body = _parse(error_response(400, reason, True))
    assert got == "HTTP/1.1 400 Bad Request"
    assert b"x-evil" not in headers
    assert not re.search(rb"[\r\n\x00]", headers[ERROR_HEADER])
    assert set(headers) == {b"content-type", b"content-length", ERROR_HEADER, b"connection"}
    assert int(headers[b"content-length"]) == len(body)


# --- normalize_authority: what the outbound router looks up in destination

AUTHORITIES = [
    (b"books.default:7002", "books.default:7002"),
    (b"Books.Default.", "books.default:80"),
    (b"books.default.:7002", "books.default:7002"),
    (b"books", "books:80"),
    (b"books:80", "books:80"),
    (b"books.default.svc.cluster.local:7002", "books.default.svc.cluster.local:7002"),
    (b"BOOKS.DEFAULT.SVC.CLUSTER.LOCAL.:7002", "books.default.svc.cluster.local:7002"),
    (b"127.0.0.1:8080", "127.0.0.1:8080"),
    (b"[::1]:8080", "[::1]:8080"),
    (b"[::1]", "[::1]:80"),
    (b"books:007002", "books:7002"),
    (b"books:1", "books:1"),
    (b"books:65535", "books:65535"),
    (b"", None),
    (b":80", None),
    (b".:80", None),
    (b"books:", None),
    (b"books:0", None),
    (b"books:65536", None),
    (b"books:99999999999", None),
    (b"books:abc", None),
    (b"books:+80", None),
    (b"books:-80", None),
    (b"books:8 0", None),
    (b"books:1:2", None),
    (b"b\xc3\xa9:80", None),
    (b"books:\xd9\xa8\xd9\xa0", None),   # Arabic-Indic "80"
    (b"[::1", None),
    (b"[::1]junk", None),
    (b"[::1]:", None),
    (b"[::1]:x", None),
]


@pytest.mark.parametrize("host,want", AUTHORITIES, ids=[repr(a[0]) for a in AUTHORITIES])
def test_normalize_authority(host: bytes, want: str | None) -> None:
    assert normalize_authority(host) == want


# --- split_target: (authority or None, origin-form path)

TARGETS = [
    (b"/", (None, b"/")),
    (b"/a/b?c=d", (None, b"/a/b?c=d")),
    (b"http://books.default:7002/x?y=1", (b"books.default:7002", b"/x?y=1")),
    (b"HTTP://Books/x", (b"Books", b"/x")),
    (b"http://books", (b"books", b"/")),
    (b"http://books?q=1", (b"books", b"/?q=1")),
    (b"http://books#frag", (b"books", b"/#frag")),
    (b"http://books:7002/a?b/c", (b"books:7002", b"/a?b/c")),
    (b"http://books:7002?b/c", (b"books:7002", b"/?b/c")),
    (b"https://books/x", (b"books", b"/x")),
    (b"http:///x", (b"", b"/x")),
    (b"http://[::1]:80/x", (b"[::1]:80", b"/x")),
    (b"*", (None, b"")),
    (b"books:7002", (None, b"")),
    (b"ftp://books/x", (None, b"")),
    (b"", (None, b"")),
    (b"http:/books", (None, b"")),
]


@pytest.mark.parametrize("target,want", TARGETS, ids=[repr(t[0]) for t in TARGETS])
def test_split_target(target: bytes, want: tuple[bytes | None, bytes]) -> None:
    assert split_target(target) == want


# --- forwarding: what goes upstream (Exchange.head) and what comes back (UpstreamConn)

HEADS = [
    ("plain", [(b"host", b"h"), (b"x-a", b"1")], {}, b"host: h\r\nx-a: 1\r\n"),
    ("hop-by-hop stripped", [(b"host", b"h"), (b"keep-alive", b"5"), (b"te", b"trailers"),
                             (b"proxy-authorization", b"x"), (b"connection", b"keep-alive"), (b"x-a", b"1")],
     {}, b"host: h\r\nx-a: 1\r\n"),
    ("connection names a header before it", [(b"x-a", b"1"), (b"connection", b"close, X-A"), (b"host", b"h"),
                                             (b"x-b", b"2")], {}, b"host: h\r\nx-b: 2\r\n"),
    ("connection names a header after it", [(b"connection", b"x-b"), (b"x-a", b"1"), (b"x-b", b"2"),
                                            (b"connection", b"x-c"), (b"x-c", b"3")], {}, b"host: h\r\nx-a: 1\r\n"),
    ("extra and drop", [(b"x-mesh-client-id", b"forged"), (b"x-a", b"1")],
     {"extra": [(b"x-mesh-client-id", b"real")], "drop": frozenset((b"x-mesh-client-id",))},
     b"host: h\r\nx-a: 1\r\nx-mesh-client-id: real\r\n"),
    ("chunked framing kept", [(b"transfer-encoding", b"chunked")], {"chunked": True},
     b"host: h\r\ntransfer-encoding: chunked\r\n"),
]


@pytest.mark.parametrize("headers,kw,want", [h[1:] for h in HEADS], ids=[h[0] for h in HEADS])
def test_request_head_forwarded(headers: list[tuple[bytes, bytes]], kw: dict, want: bytes) -> None:
    ex = get(headers, kw.pop("chunked", False))
    assert ex.head(b"/p", b"h", **kw) == b"GET /p HTTP/1.1\r\n" + want + b"\r\n"


def test_header_value_checks_survive_the_cache() -> None:
    ok = [(b"host", b"h"), (b"x-a", b"fine")]
    for _ in range(3):
        assert check_head("1.1", ok) == (None, False, b"h")
    with pytest.raises(Reject):
        check_head("1.1", [(b"host", b"h"), (b"x-a", b"fi\x00ne")])


RESPONSES = [
    ("headers in order, lower-cased, framing kept",
     b"HTTP/1.1 200 OK\r\nServer: s\r\nContent-Length: 2\r\nSet-Cookie: a\r\nset-cookie: b\r\n\r\nok",
     b"HTTP/1.1 200 OK\r\nserver: s\r\nset-cookie: a\r\nset-cookie: b\r\ncontent-length: 2\r\n\r\nok"),
    ("hop-by-hop dropped", b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
     b"Content-Length: 0\r\n\r\n", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
    ("connection-named headers dropped", b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: X-A, x-b\r\nX-B: 2\r\n"
     b"X-C: 3\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 200 OK\r\nx-c: 3\r\ncontent-length: 0\r\n\r\n"),
    ("the status code's own reason phrase", b"HTTP/1.1 404 Nope\r\nContent-Length: 0\r\n\r\n",
     b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"),
    ("an unknown code", b"HTTP/1.1 299 Whatever\r\nContent-Length: 0\r\n\r\n",
     b"HTTP/1.1 299 Unknown\r\ncontent-length: 0\r\n\r\n"),
    ("chunked stays chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("raw,want", [r[1:] for r in RESPONSES], ids=[r[0] for r in RESPONSES])
def test_response_head_forwarded(raw: bytes, want: bytes) -> None:
    assert relay([raw]) == [want]
