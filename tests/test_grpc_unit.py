"""microproxy/grpc.py and the HTTP/2 preface check: tables, no loop."""
from __future__ import annotations

import pytest

from microproxy import grpc
from microproxy.h2proxy import PREFACE, clean_headers, is_preface


@pytest.mark.parametrize("http, gs, is_grpc, failed", [
    (200, 0, True, False),
    (200, 14, True, True),        # HTTP 200 + UNAVAILABLE is a failure
    (200, None, True, True),      # a gRPC response without grpc-status
    (500, 0, True, False),        # gRPC status takes precedence
    (200, None, False, False),
    (503, None, False, True),
    (0, None, False, True),       # no response at all
])
def test_classification(http: int, gs: int | None, is_grpc: bool, failed: bool) -> None:
    assert grpc.failed(http, gs, is_grpc) is failed


@pytest.mark.parametrize("value, secs", [(b"100m", 0.1), (b"5S", 5.0), (b"1H", 3600.0), (b"7u", 7e-6),
                                         (b"", None), (b"5", None), (b"5x", None), (b"123456789S", None)])
def test_timeout(value: bytes, secs: float | None) -> None:
    assert grpc.parse_timeout(value) == (pytest.approx(secs) if secs is not None else None)


def test_proxy_made_errors_are_trailers_only() -> None:
    h = dict(grpc.trailers_only(grpc.UNAVAILABLE, "unknown service a.b:1"))
    assert h[b":status"] == b"200" and h[b"grpc-status"] == b"14"
    assert h[b"content-type"] == b"application/grpc"
    assert h[b"grpc-message"] == b"unknown service a.b:1"
    assert dict(grpc.trailers_only(7, "100% denied\n"))[b"grpc-message"] == b"100%25 denied%0A"
    assert grpc.status_for_http(403) == grpc.PERMISSION_DENIED
    assert grpc.status_for_http(503) == grpc.UNAVAILABLE
    assert grpc.status_for_http(504) == grpc.DEADLINE_EXCEEDED
    assert grpc.parse_status(b"14") == 14 and grpc.parse_status(b"x") == grpc.UNKNOWN
    assert grpc.is_grpc(b"application/grpc+proto") and not grpc.is_grpc(b"application/json")


@pytest.mark.parametrize("data, h2", [(PREFACE, True), (PREFACE + b"\x00\x00", True), (PREFACE[:5], True),
                                      (b"PRI * HTTP/1.1\r\n", False), (b"PRI", True), (b"PR", False),
                                      (b"GET / HTTP/1.1\r\n", False)])
def test_preface(data: bytes, h2: bool) -> None:
    assert is_preface(data) is h2


def test_hop_by_hop_headers_are_not_forwarded() -> None:
    hs = [(b":method", b"GET"), (b"connection", b"x"), (b"te", b"trailers"), (b"te", b"gzip"),
          (b"upgrade", b"h2c"), (b"x-a", b"1"), (b"x-mesh-client-id", b"spoof")]
    assert clean_headers(hs, frozenset((b"x-mesh-client-id",))) == [
        (b":method", b"GET"), (b"te", b"trailers"), (b"x-a", b"1")]
