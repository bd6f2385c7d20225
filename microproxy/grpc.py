"""gRPC over HTTP/2, as far as a proxy needs it: recognise a gRPC call, classify its
outcome from ``grpc-status``, and answer proxy-made errors the way gRPC clients expect.

- A call is gRPC when its request ``content-type`` starts with ``application/grpc``.
- Its outcome is the ``grpc-status`` in the trailers, or in the response headers of a
  *trailers-only* response (HEADERS with END_STREAM). ``0`` (OK) is a success; any other
  code is a failure, whatever the HTTP status (Linkerd: "gRPC status takes precedence").
  A gRPC response that ends without any grpc-status is a failure too.
- Proxy-made errors are trailers-only responses: ``:status 200``, ``grpc-status`` and a
  percent-encoded ``grpc-message`` (gRPC's PROTOCOL-HTTP2.md), never bare HTTP statuses.
"""
from __future__ import annotations

from urllib.parse import quote

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
UNAVAILABLE = 14

# codes that count against an endpoint in failure accrual (Linkerd's consecutive mode)
BREAKER_CODES = frozenset((DEADLINE_EXCEEDED, PERMISSION_DENIED, INTERNAL, UNAVAILABLE, 15))
CONTENT_TYPE = b"application/grpc"
ERROR_HEADER = b"x-mesh-proxy-error"

# gRPC's mapping of HTTP statuses to codes (doc/http-grpc-status-mapping.md), used for
# errors the proxy makes; a timeout is DEADLINE_EXCEEDED, as Linkerd answers it.
_FROM_HTTP = {400: INTERNAL, 401: 16, 403: PERMISSION_DENIED, 404: 12, 429: UNAVAILABLE,
              431: RESOURCE_EXHAUSTED, 502: UNAVAILABLE, 503: UNAVAILABLE, 504: DEADLINE_EXCEEDED}
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def is_grpc(content_type: bytes | None) -> bool:
    return content_type is not None and content_type[:16].lower() == CONTENT_TYPE


def status_for_http(status: int) -> int:
    return _FROM_HTTP.get(status, UNKNOWN)


def parse_status(value: bytes | None) -> int | None:
    """``grpc-status`` as an int; None when absent; UNKNOWN when malformed."""
    if value is None:
        return None
    return int(value) if value.isdigit() and len(value) <= 3 else UNKNOWN


def parse_timeout(value: bytes | None) -> float | None:
    """``grpc-timeout`` (``100m``, ``5S``, at most 8 digits) in seconds, or None."""
    if not value or len(value) > 9 or not value[:-1].isdigit():
        return None
    unit = _TIMEOUT_UNITS.get(value[-1:])
    return None if unit is None else int(value[:-1]) * unit


def failed(http_status: int, grpc_status: int | None, grpc: bool) -> bool:
    """The response classification: True is ``classification="failure"``."""
    if grpc:
        return grpc_status != OK
    return http_status >= 500 or http_status == 0


def encode_message(reason: str) -> bytes:
    return quote(reason, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~").encode("ascii")


def trailers_only(code: int, reason: str) -> list[tuple[bytes, bytes]]:
    """The headers of a proxy-made gRPC error (sent with END_STREAM)."""
    return [(b":status", b"200"), (b"content-type", CONTENT_TYPE),
            (b"grpc-status", b"%d" % code), (b"grpc-message", encode_message(reason)),
            (ERROR_HEADER, encode_message(reason))]
