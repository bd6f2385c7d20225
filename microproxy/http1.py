"""HTTP/1.1 proxying on httptools: message rules and the ``Exchange`` (this module), the
server side (``downstream.ServerConn``: a client's connection to us, and CONNECT tunnels)
and the upstream side (``upstream.UpstreamConn`` and ``Pool``: our pooled connections to a
peer proxy or the app, with pipelining between proxies).

Theory of operation
-------------------
A ``ServerConn`` parses requests. Each request becomes an ``Exchange``. One exchange is
*active* at a time per connection; pipelined requests wait in a queue with reading paused.
The connection hands the active exchange to its ``Router`` (outbound or inbound), which
picks an upstream and calls ``UpstreamConn.attach(exchange)``; request body bytes flow
``ServerConn -> Exchange -> UpstreamConn`` and response bytes flow back directly from the
``UpstreamConn`` to the ``ServerConn``'s transport. Nothing is buffered whole: when either
transport's write buffer passes its high-water mark, the other side stops reading
(``pause_reading``) until it drains. The exchange ends when the response ends; the
upstream goes back to its pool if both messages ended cleanly.

Between our own proxies, bodiless GETs are pipelined under load (``upstream.Pipelining``):
an ``UpstreamConn`` then carries the exchange in flight plus a queue behind it, and the
inbound ``ServerConn`` forwards such GETs at once, holding each response (``Exchange.buf``)
until the ones before it are written.

Strictness (REFERENCE-hardening.md §3): llhttp (inside httptools) rejects malformed
framing, and ``check_head`` adds what it lets through: CL+TE, non-digit or conflicting
Content-Length, Transfer-Encoding other than a single ``chunked``, control bytes in values,
bad header names, missing/duplicate/invalid Host, versions other than 1.0/1.1, too many or
too large headers (431). A rejected request gets a 400/431/501 and the connection closes.
"""
from __future__ import annotations

import logging
import re
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .downstream import ServerConn
    from .upstream import UpstreamConn

log = logging.getLogger(__name__)

MAX_HEADERS = 100
MAX_CONCURRENT = 32          # pipelined requests from one peer forwarded at once (inbound)
MAX_HEAD_BYTES = 60 * 1024
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
ERROR_HEADER = b"x-mesh-proxy-error"

_DIGITS = re.compile(rb"^[0-9]{1,19}\Z")   # \Z: "$" would also match before a final "\n"
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_CTL = re.compile(rb"[\x00-\x1f\x7f]")
# header names and hosts already seen valid skip their pattern (a set lookup costs a fifth)
_OK_CACHE = 512
_NAMES_OK: set[bytes] = set()
_VALUES_OK: set[bytes] = set()
_HOSTS_OK: set[bytes] = set()
_HOST = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~!$&'()*+,;=%]+)(:[0-9]{1,5})?\Z")
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"http2-settings", b"proxy-authorization",
                        b"proxy-authenticate"))
REASONS = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found",
           408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
           503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}


FRAMING = frozenset((b"content-length", b"transfer-encoding"))
# Connection tokens that name no header to drop: hop-by-hop ones (dropped anyway), and the
# framing and Host, which the proxy writes itself (dropping Content-Length would let the body
# be read as the next request)
CONNECTION_OPTIONS = HOP_BY_HOP | FRAMING | {b"host", b"close", b""}


class Reject(Exception):
    """A request we refuse before forwarding it: answered with ``status`` and closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_head(version: str, headers: list[tuple[bytes, bytes]]) -> tuple[int | None, bool, bytes | None]:
    """Validate a request head beyond llhttp. Returns (content_length, chunked, host).

    Header names are lower-cased by the caller. Raises Reject."""
    if version not in ("1.1", "1.0"):
        raise Reject(505 if version.startswith(("2", "3")) else 400, f"unsupported HTTP version {version}")
    cl: int | None = None
    te: list[bytes] = []
    host: bytes | None = None
    hosts = 0
    for name, value in headers:
        if name not in _NAMES_OK:
            if not _TOKEN.match(name):
                raise Reject(400, "invalid header name")
            if len(_NAMES_OK) < _OK_CACHE:
                _NAMES_OK.add(name)
        if value not in _VALUES_OK:
            if _BAD_VALUE.search(value):
                raise Reject(400, "invalid character in header value")
            if len(_VALUES_OK) < _OK_CACHE and len(value) <= 256:
                _VALUES_OK.add(value)
        if name == b"content-length":
            for part in value.split(b","):
                part = part.strip(b" \t")
                if not _DIGITS.match(part):
                    raise Reject(400, "invalid content-length")
                n = int(part)
                if cl is not None and n != cl:
                    raise Reject(400, "conflicting content-length")
                cl = n
        elif name == b"transfer-encoding":
            te.extend(p.strip(b" \t").lower() for p in value.split(b","))
        elif name == b"host":
            hosts += 1
            host = value.strip(b" \t")
    if te:
        if version == "1.0":
            raise Reject(400, "transfer-encoding in an HTTP/1.0 request")
        if cl is not None:
            raise Reject(400, "content-length and transfer-encoding together")
        if te != [b"chunked"]:
            raise Reject(501, "unsupported transfer-encoding")
    if hosts > 1:
        raise Reject(400, "duplicate host header")
    if host is not None and host not in _HOSTS_OK:
        if not host or not _HOST.match(host):
            raise Reject(400, "invalid host header")
        if len(_HOSTS_OK) < _OK_CACHE:
            _HOSTS_OK.add(host)
    if host is None and version == "1.1":
        raise Reject(400, "missing host header")
    return cl, bool(te), host


def parse_digits(value: bytes) -> int | None:
    """A strict non-negative integer (no sign, no spaces, no underscores), or None."""
    return int(value) if _DIGITS.match(value) else None


def error_response(status: int, reason: str, close: bool, grpc: bool = False) -> bytes:
    body = f"{reason}\n".encode()
    head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"Error")),
            b"content-type: text/plain\r\ncontent-length: %d\r\n" % len(body),
            ERROR_HEADER + b": " + _CTL.sub(b" ", reason.encode("ascii", "replace")) + b"\r\n"]
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    return b"".join(head) + body


class Router(Protocol):
    def dispatch(self, conn: "ServerConn", ex: "Exchange") -> None: ...
    def tunnel(self, conn: "ServerConn", ex: "Exchange", rest: bytes) -> None: ...


class Exchange:
    """One request/response pair passing through the proxy."""

    __slots__ = ("method", "target", "version", "headers", "host", "keep_alive", "chunked",
                 "length", "body", "body_buffered", "body_done", "upstream", "start",
                 "status", "resp_started", "done", "metric_key", "authority", "flag", "attempts",
                 "body_sent", "wire_head", "endpoint", "resp_at", "tap", "resp_bytes", "span",
                 "route", "timer", "backend_timeout", "on_finish", "rs", "tee", "buf", "buf_len",
                 "dispatched", "close_after", "truncated")

    def __init__(self, method: bytes, target: bytes, version: str,
                 headers: list[tuple[bytes, bytes]], host: bytes | None, keep_alive: bool,
                 chunked: bool, length: int | None) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.host = host
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.length = length
        self.body: list[bytes] = []   # body bytes (already framed for upstream) not yet sent
        self.body_buffered = 0
        self.body_done = not chunked and not length
        self.body_sent = False
        self.upstream: UpstreamConn | None = None
        self.start = perf_counter()
        self.status = 0
        self.resp_started = False
        self.done = False
        self.metric_key = ""
        self.authority = ""
        self.flag = ""
        self.attempts = 0
        self.wire_head = b""
        self.endpoint: Any = None
        self.resp_at = 0.0            # when the response head arrived (latency = time to first byte)
        self.tap: Any = None          # a TapHub handle when someone taps this request
        self.resp_bytes = 0           # counted only while tapped
        self.span: Any = None         # a tracing.Span when this request is traced
        self.route: Any = None        # outbound: the core.routing.Route it matched
        self.timer: Any = None        # a loop.call_later handle (route timeout); cancelled at the end
        self.backend_timeout: float | None = None   # per attempt (timeouts.backendRequest), seconds
        self.on_finish: Any = None    # (ex) -> None, called once when the exchange ends
        self.rs: Any = None           # outbound: resilience.ReqState (attempts, retries, admission)
        self.tee: Any = None          # outbound: a mirror.Tee copying the request body for mirrors
        # inbound, pipelined (see ServerConn.send): the response waits in ``buf`` until every
        # earlier response on the connection was written
        self.buf: list[bytes] | None = None
        self.buf_len = 0
        self.dispatched = False       # sent upstream while an earlier exchange was active
        self.close_after = False      # finished before its turn: close the connection after it
        self.truncated = False        # ... and its response was cut: abort after its bytes

    def head(self, target: bytes, host: bytes | None, extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
             drop: frozenset[bytes] = frozenset()) -> bytes:
        """Serialize the request head for upstream: hop-by-hop headers stripped, framing kept."""
        parts = [self.method, b" ", target, b" HTTP/1.1\r\n"]
        if host is not None:
            parts += (b"host: ", host, b"\r\n")
        nominated = False
        for name, value in self.headers:
            if name in HOP_BY_HOP or name == b"host" or name in drop:
                if name == b"connection" and not nominated:
                    nominated = any(t not in CONNECTION_OPTIONS and t not in drop
                                    for t in (t.strip().lower() for t in value.split(b",")))
                continue
            parts += (name, b": ", value, b"\r\n")
        if nominated:   # Connection names more headers to drop (RFC 9110 §7.6.1): once more, without them
            conn_tokens = {t.strip().lower() for n, v in self.headers if n == b"connection" for t in v.split(b",")}
            return self.head(target, host, extra, drop | (conn_tokens - CONNECTION_OPTIONS))
        for name, value in extra:
            parts += (name, b": ", value, b"\r\n")
        if self.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def pipelinable(self) -> bool:
        """May this request share an upstream connection with requests ahead of it? Only a
        bodiless GET with no timer and no retry policy: it is safe to send again if the
        connection dies, and nothing ever has to cut its connection short."""
        rs = self.rs
        return (self.method == b"GET" and not self.chunked and not self.length and self.tee is None
                and self.timer is None and self.backend_timeout is None
                and (rs is None or rs.policy is None))
