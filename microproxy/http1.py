"""HTTP/1.1 proxying on httptools: the server side (a client's connection to us), the
upstream side (our pooled connection to a peer or the app), and CONNECT tunnels.

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

Strictness (REFERENCE-hardening.md §3): llhttp (inside httptools) rejects malformed
framing, and ``check_head`` adds what it lets through: CL+TE, non-digit or conflicting
Content-Length, Transfer-Encoding other than a single ``chunked``, control bytes in values,
bad header names, missing/duplicate/invalid Host, versions other than 1.0/1.1, too many or
too large headers (431). A rejected request gets a 400/431/501 and the connection closes.
"""
from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol

import httptools

from .core.routing import modify_headers
from .metrics import labels
from .observe import TapHub
from .tls import peer_identity

if TYPE_CHECKING:
    from .metrics import Metrics

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
_HOST = re.compile(rb"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_~!$&'()*+,;=%]+)(:[0-9]{1,5})?\Z")
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"http2-settings", b"proxy-authorization",
                        b"proxy-authenticate"))
REASONS = {200: b"OK", 400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found",
           408: b"Request Timeout", 413: b"Content Too Large", 431: b"Request Header Fields Too Large",
           500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
           503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported"}


FRAMING = frozenset((b"content-length", b"transfer-encoding"))
RESP_SPECIAL = FRAMING | {b"connection"}


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
        if not _TOKEN.match(name):
            raise Reject(400, "invalid header name")
        if _BAD_VALUE.search(value):
            raise Reject(400, "invalid character in header value")
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
    if host is not None and (not host or not _HOST.match(host)):
        raise Reject(400, "invalid host header")
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
        conn_tokens: set[bytes] = set()
        for name, value in self.headers:
            if name == b"connection":
                conn_tokens.update(t.strip().lower() for t in value.split(b","))
        parts = [self.method, b" ", target, b" HTTP/1.1\r\n"]
        if host is not None:
            parts += [b"host: ", host, b"\r\n"]
        for name, value in self.headers:
            if name in HOP_BY_HOP or name == b"host" or name in drop or name in conn_tokens:
                continue
            parts += [name, b": ", value, b"\r\n"]
        for name, value in extra:
            parts += [name, b": ", value, b"\r\n"]
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


class ServerConn(asyncio.Protocol):
    """A client's connection to one of our listeners."""

    def __init__(self, router: Router, metrics: "Metrics", registry: set["ServerConn"],
                 loop: asyncio.AbstractEventLoop, direction: str = "outbound",
                 tls: bool = False) -> None:
        self.router = router
        self.metrics = metrics
        self.registry = registry
        self.loop = loop
        self.direction = direction
        self.tls = tls
        self.peer_id: str | None = None
        self.tcp_key = ""
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.active: Exchange | None = None
        self.reading: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.paused: set[str] = set()
        self.closing = False
        self.tunnel_peer: Any = None
        self.out: list[bytes] | None = None
        self.read_bytes = 0
        self.written = 0
        self.last_active = 0.0
        self.cache: dict[bytes, Any] = {}   # per-connection route/label cache for the router
        # inbound from a peer proxy: pipelined GETs are forwarded at once, answered in order
        self.concurrent = direction == "inbound" and tls
        self.flush_due = False
        # per-message parse state
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False

    # --- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.registry.add(self)
        if self.direction == "inbound":
            if self.tls:
                self.peer_id = peer_identity(transport.get_extra_info("ssl_object"))
                self.tcp_key = labels(direction="inbound", peer="src", tls="true",
                                      client_id=self.peer_id or "")
            else:
                self.tcp_key = labels(direction="inbound", peer="src", tls="no_identity",
                                      no_tls_reason="no_tls_from_remote")
        else:
            self.tcp_key = labels(direction="outbound", peer="src")
        self.metrics.tcp_opened(self.tcp_key)
        self.last_active = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self.metrics.tcp_closed(self.tcp_key, self.read_bytes, self.written)
        self.closing = True
        if self.tunnel_peer is not None:
            self.tunnel_peer.close()
        ex = self.active
        if ex is not None:
            self._abandon(ex)
        for q in self.queue:
            if q.dispatched:
                self._abandon(q)
            q.done = True
        self.queue.clear()

    def _abandon(self, ex: Exchange) -> None:
        """The client left while ``ex`` was in flight."""
        if ex.done:
            return
        ex.done = True
        if ex.on_finish is not None:
            ex.on_finish(ex)
        if ex.rs is not None:
            ex.rs.finish(ex)
        if ex.metric_key and ex.resp_started:
            # The client left mid-response (e.g. it read a 500's head and hung up): the
            # response still happened and counts, with its status.
            self._record(ex, None if ex.status >= 500 else "client disconnected")
        if ex.span is not None:
            ex.span.finish(ex, self)  # the client left before the response ended
        up = ex.upstream
        if up is not None:
            up.drop(ex)  # the response has nowhere to go

    def data_received(self, data: bytes) -> None:
        if not self.read_bytes and data[:3] == b"PRI":   # the first bytes only: HTTP/2 preface?
            from .h2proxy import take_over               # lazy: h2 only when HTTP/2 shows up
            if take_over(self, data):
                return
        self.read_bytes += len(data)
        self.last_active = self.loop.time()
        if self.tunnel_peer is not None:
            self.tunnel_peer.write(data)
            return
        if self.closing and (self.reading is None or self.reading.body_done):
            return  # after Connection: close, later pipelined bytes are not processed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            offset = e.args[0]
            ex = self.reading
            if ex is not None and ex.method == b"CONNECT":
                self._start_tunnel(ex, data[offset:])
            else:
                # An Upgrade request: we strip Upgrade and go on parsing as plain HTTP/1.1.
                self.data_received_rest(data[offset:])
        except httptools.HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, Reject):
                self._reject(cause.status, cause.reason)
            else:
                log.error("request handling failed", exc_info=cause)
                self._reject(502, "proxy error")
        except httptools.HttpParserError as e:
            if self.closing and self.reading is not None and self.reading.body_done:
                return  # bytes after a Connection: close request; ignored (RFC 9112 §9.6)
            self._reject(400, f"malformed request: {e}")

    def data_received_rest(self, data: bytes) -> None:
        if data:
            self.read_bytes -= len(data)
            self.data_received(data)

    def pause_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause("downstream")
        if self.tunnel_peer is not None:
            self.tunnel_peer.pause_reading()

    def resume_writing(self) -> None:
        ex = self.active
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume("downstream")
        if self.tunnel_peer is not None:
            self.tunnel_peer.resume_reading()

    # --- reading control
    def pause(self, why: str) -> None:
        if not self.paused:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        if why in self.paused:
            self.paused.discard(why)
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    # --- httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._in_head = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise Reject(431, "request head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES:
            raise Reject(431, "request head too large")
        if len(self._headers) >= MAX_HEADERS:
            raise Reject(431, "too many headers")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        p = self.parser
        version = p.get_http_version()
        cl, chunked, host = check_head(version, self._headers)
        keep_alive = p.should_keep_alive()
        ex = Exchange(p.get_method(), self._url, version, self._headers, host, keep_alive,
                      chunked, cl)
        self.reading = ex
        if not keep_alive:
            self.closing = True  # nothing after this request is processed
        if ex.method == b"CONNECT":
            return  # handled when llhttp reports the upgrade
        if self.active is None:
            self.active = ex
            self.router.dispatch(self, ex)
        elif self.concurrent and ex.method == b"GET" and ex.body_done and keep_alive \
                and len(self.queue) < MAX_CONCURRENT and (not self.queue or self.queue[-1].dispatched):
            ex.buf = []
            ex.dispatched = True
            self.queue.append(ex)
            self.router.dispatch(self, ex)
        else:
            self.queue.append(ex)
            self.pause("pipeline")

    def on_body(self, data: bytes) -> None:
        ex = self.reading
        if ex is None or ex.done:
            return
        if ex.chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if ex.tee is not None:
            ex.tee.feed(ex, data)
        up = ex.upstream
        if up is not None and ex.body_sent:
            up.write(data)
        else:
            ex.body.append(data)
            ex.body_buffered += len(data)
            if ex.body_buffered > HIGH_WATER:
                self.pause("buffer")

    def on_message_complete(self) -> None:
        ex = self.reading
        if ex is None:
            return
        ex.body_done = True
        if ex.chunked:
            if ex.upstream is not None and ex.body_sent:
                ex.upstream.write(b"0\r\n\r\n")
            else:
                ex.body.append(b"0\r\n\r\n")
        if ex.tee is not None:
            ex.tee.done(ex, b"0\r\n\r\n" if ex.chunked else b"")

    # --- used by routers and upstreams
    def write(self, data: bytes) -> None:
        self.written += len(data)
        out = self.out
        if out is not None:
            out.append(data)  # corked: flushed as one write when the upstream read is parsed
        else:
            self.transport.write(data)

    def send(self, ex: Exchange, data: bytes) -> None:
        """Response bytes of ``ex``: written now when it is the active exchange, else kept
        until its turn (a pipelined request answered before the ones ahead of it)."""
        buf = ex.buf
        if buf is None:
            self.write(data)
            return
        buf.append(data)
        ex.buf_len += len(data)
        if ex.buf_len > HIGH_WATER and ex.upstream is not None:
            ex.upstream.pause("downstream")

    def cork(self) -> None:
        if self.out is None:
            self.out = []

    def uncork(self) -> None:
        out = self.out
        if out and self.concurrent and (self.queue or self.flush_due):
            # more pipelined responses may end in this loop iteration: one write for all
            if not self.flush_due:
                self.flush_due = True
                self.loop.call_soon(self._flush_due)
            return
        self.out = None
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _flush_due(self) -> None:
        self.flush_due = False
        out, self.out = self.out, None
        if out and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def flush(self) -> None:
        out = self.out
        if out:
            self.out = []
            self.transport.write(b"".join(out))

    def respond_error(self, ex: Exchange, status: int, reason: str, flag: str) -> None:
        """Answer ``ex`` ourselves (a proxy-made error) and log it with a response flag."""
        if ex.done:
            return
        ex.flag = flag
        log.warning("proxy error", extra={"status": status, "reason": reason, "flag": flag,
                                          "authority": ex.authority})
        if ex.resp_started:
            # The response is cut short: the client must see it end abruptly (an abort), but
            # only after the complete responses ahead of it.
            if ex is not self.active and ex.buf is not None:
                ex.truncated = True   # pipelined, not its turn yet: _next aborts after its bytes
                self.finish(ex, reusable=False)
                return
            self.finish(ex, reusable=False, close=True)   # flushes what is corked, then closes
            self.transport.abort()
            return
        close = not ex.body_done or not ex.keep_alive or self.closing
        ex.status = status
        self.send(ex, error_response(status, reason, close))
        self.finish(ex, reusable=False, close=close)

    def _record(self, ex: Exchange, error: str | None) -> None:
        """Count the response: metrics, rolling window, tap."""
        status = ex.status
        t = ex.resp_at or perf_counter()
        latency = (t - ex.start) * 1000.0
        failure = status >= 500
        self.metrics.record(ex.metric_key, status, failure, latency, t)
        if ex.tap is not None:
            TapHub.finish(ex.tap, status, int(latency * 1000),
                          int((perf_counter() - ex.start) * 1e6), ex.resp_bytes, error)

    def finish(self, ex: Exchange, reusable: bool = True, close: bool = False) -> None:
        """The response to ``ex`` has been fully written."""
        if ex.done:
            return
        ex.done = True
        if ex.on_finish is not None:
            ex.on_finish(ex)   # e.g. cancel a route timeout, count the route's response
        if ex.rs is not None:
            ex.rs.finish(ex)   # resilience: admission slot, open attempt, route stats
        if ex.metric_key:
            self._record(ex, ex.flag or None)
        if ex.span is not None:
            ex.span.finish(ex, self)
        if ex.flag or log.isEnabledFor(logging.DEBUG):
            log.info("access", extra={"direction": self.direction, "authority": ex.authority,
                                      "status": ex.status, "flag": ex.flag, "client_id": self.peer_id})
        close = close or not ex.keep_alive or not ex.body_done
        if ex is not self.active:   # pipelined, answered before its turn: see _next
            ex.close_after = close
            return
        self._next(close)

    def _next(self, close: bool) -> None:
        """The active exchange ended: the next one's turn (or close)."""
        while True:
            self.active = None
            if close or (self.closing and not self.queue):
                self.flush()
                self.transport.close()
                return
            if self.paused:
                self.resume("buffer")
            if not self.queue:
                return
            nxt = self.queue.popleft()
            self.active = nxt
            if not self.queue or self.queue[-1].dispatched:
                self.resume("pipeline")
            if not nxt.dispatched:
                self.router.dispatch(self, nxt)
                return
            buf, nxt.buf = nxt.buf, None
            if buf:
                self.write(b"".join(buf))
            if not nxt.done:
                if nxt.upstream is not None:
                    nxt.upstream.resume("downstream")
                return
            if nxt.truncated:
                self.active = None
                self.flush()
                self.transport.abort()
                return
            close = nxt.close_after

    def _reject(self, status: int, reason: str) -> None:
        log.info("rejected request", extra={"status": status, "reason": reason})
        self.closing = True
        ex = self.active
        if ex is not None and not ex.done:
            if ex is self.reading and not ex.resp_started:
                # its own body is malformed (e.g. a bad chunk size) and nothing was answered yet:
                # drop the half-sent upstream request and answer the client ourselves
                if ex.upstream is not None:
                    ex.upstream.abort()
                ex.status = status
                self.write(error_response(status, reason, close=True))
                self.finish(ex, reusable=False, close=True)
                return
            # the broken request is pipelined behind one in flight: drop the connection
            self.transport.abort()
            return
        self.write(error_response(status, reason, close=True))
        self.transport.close()

    def _start_tunnel(self, ex: Exchange, rest: bytes) -> None:
        if self.active is not None:
            self._reject(400, "CONNECT pipelined behind another request")
            return
        self.active = ex
        self.pause("tunnel")
        self.router.tunnel(self, ex, rest)

    def start_splice(self, peer: Any, rest: bytes) -> None:
        """Become a byte pipe to ``peer`` (a transport)."""
        self.tunnel_peer = peer
        if rest:
            peer.write(rest)
        self.resume("tunnel")

    def graceful_close(self) -> None:
        """Shutdown: close now if idle, else after the response in flight."""
        self.closing = True
        if self.active is None and self.tunnel_peer is None:
            self.transport.close()


OK_CONNECT = b"HTTP/1.1 200 Connection Established\r\n\r\n"


class UpstreamConn(asyncio.Protocol):
    """Our connection to a peer proxy or the local app; carries one exchange at a time."""

    def __init__(self, pool: "Pool") -> None:
        self.pool = pool
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.ex: Exchange | None = None
        self.server: ServerConn | None = None
        self.paused: set[str] = set()
        self.closed = False
        self.reused = False
        self.resp_chunked = False
        self.resp_until_close = False
        self.resp_keep_alive = True
        self.reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.idle_since = 0.0
        self.draining = False            # reading a response that is being retried (not forwarded)
        self.on_close: Any = None        # () -> None once the connection is gone (per-service count)
        # pipelining (meshed pools): exchanges whose requests were sent after the one in
        # flight, in order; a None server is a client that left (its response is discarded)
        self.pipe: deque[tuple[Exchange, ServerConn | None]] = deque()
        self.pipelinable = False         # every exchange here may have others pipelined behind it
        self.since = 0.0                 # when the exchange in flight was sent
        self.wout: list[bytes] | None = None   # pipelined request heads not yet written
        self.corked: list[ServerConn] | None = None   # servers corked while a read is parsed

    # --- asyncio.Protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        pipe, self.pipe = self.pipe, deque()
        for pex, pserver in pipe:   # bodiless GETs never answered: safe to send once more
            if pserver is None or pex.done:
                continue
            pex.upstream = None
            pex.body_sent = False
            if pex.attempts == 0:
                pex.attempts += 1
                self.pool.router_retry(pserver, pex)
            else:
                pserver.respond_error(pex, 502, "upstream connection lost", "UC")
        ex, server = self.ex, self.server
        self.ex = self.server = None
        if ex is None or server is None or ex.done:
            return
        if self.resp_until_close and ex.resp_started:
            if self.resp_chunked:
                server.send(ex, b"0\r\n\r\n")
            server.finish(ex, reusable=False)
            return
        if not ex.resp_started and self.reused and ex.attempts == 0 and not ex.chunked and not ex.length:
            # A pooled connection the peer had already closed: a bodiless request is safe
            # to send once more on a new connection.
            ex.attempts += 1
            ex.upstream = None
            ex.body_sent = False
            self.pool.router_retry(server, ex)
            return
        if ex.rs is not None and not ex.resp_started:
            ex.upstream = None
            ex.rs.on_failure(ex, server, 502, "upstream connection lost", "UC")
            return
        server.respond_error(ex, 502, "upstream connection lost", "UC")

    def data_received(self, data: bytes) -> None:
        # Each client's bytes from this read leave in one write: its server is corked until
        # the read is parsed (with pipelining, one read can answer several clients).
        server = self.server
        corked = self.corked = [] if server is None else [server]
        if server is not None and server.out is None:
            server.out = []   # cork
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("unexpected protocol upgrade from upstream")
        except httptools.HttpParserError as e:
            self._fail(f"malformed response from upstream: {e}")
        finally:
            self.corked = None
            for server in corked:
                server.uncork()

    def _fail(self, reason: str) -> None:
        ex, server = self.ex, self.server
        self.abort()
        if ex is not None and server is not None:
            if ex.rs is not None and not ex.resp_started:
                ex.upstream = None
                ex.rs.on_failure(ex, server, 502, reason, "UPE")
                return
            server.respond_error(ex, 502, reason, "UPE")

    def pause_writing(self) -> None:
        if self.server is not None:
            self.server.pause("upstream")

    def resume_writing(self) -> None:
        if self.server is not None:
            self.server.resume("upstream")

    def pause(self, why: str) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        if why in self.paused:
            self.paused.discard(why)
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    # --- driving an exchange
    def attach(self, ex: Exchange, server: ServerConn, head: bytes,
               pipelinable: bool | None = None) -> None:
        self.ex, self.server = ex, server
        ex.upstream = self
        pool = self.pool
        self.resp_chunked = self.resp_until_close = False
        self.resp_keep_alive = True
        if pool.depth > 1:
            self.since = ex.start
            pool.busy.append(self)
            self.pipelinable = ex.pipelinable() if pipelinable is None else pipelinable
            if self.pipelinable and len(pool.busy) >= pool.after:
                # bodiless, and GETs may be pipelined behind it in this loop iteration: its
                # head leaves with theirs (at light load it is written at once, as always)
                ex.body_sent = True
                self._queue_head(head)
                return
        body = ex.body
        if body:
            data = b"".join(body)
            if ex.rs is not None:
                ex.rs.keep_body(ex, data)
            self.transport.write(head + data)
            ex.body = []
            server.resume("buffer")
        else:
            self.transport.write(head)
        ex.body_sent = True

    def pipeline(self, ex: Exchange, server: ServerConn, head: bytes) -> None:
        """Send ``ex`` behind the exchanges in flight here (HTTP/1.1 pipelining); the heads
        sent in one loop iteration leave in one write (one TLS record)."""
        self.pipe.append((ex, server))
        ex.upstream = self
        ex.body_sent = True
        self._queue_head(head)

    def _queue_head(self, head: bytes) -> None:
        out = self.wout
        if out is None:
            self.wout = [head]
            self.pool.loop.call_soon(self._write_heads)
        else:
            out.append(head)

    def _write_heads(self) -> None:
        out, self.wout = self.wout, None
        if out and not self.closed:
            self.transport.write(b"".join(out))

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def drop(self, ex: Exchange) -> None:
        """The client of ``ex`` left. Alone here: close. Pipelined with others: read its
        response to the end and discard it, so theirs still arrive."""
        if not self.pipe:
            self.abort()
            return
        if ex is self.ex:
            self.server = None
            self.draining = True
            if self.paused:   # paused for that client's sake: the others must not wait
                self.paused.clear()
                if not self.closed:
                    self.transport.resume_reading()
            return
        self.pipe = deque((e, None if e is ex else s) for e, s in self.pipe)

    def abort(self) -> None:
        self.ex = self.server = None
        if not self.closed:
            self.closed = True
            self.pool.discard(self)
            self.transport.abort()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.discard(self)
            self.transport.close()

    # --- httptools callbacks (no on_message_begin: the head's state is taken, and reset,
    # when the head is complete; one call less per response)
    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        headers, reason = self._headers, self.reason
        self._headers, self.reason = [], b""
        ex, server = self.ex, self.server
        if ex is None or server is None:
            return
        parser = self.parser
        status = parser.get_status_code()
        conn_tokens: set[bytes] | None = None
        has_len = False
        chunked = False
        for name, value in headers:
            if name in RESP_SPECIAL:
                if name == b"connection":
                    if conn_tokens is None:
                        conn_tokens = set()
                    if b"," in value:
                        conn_tokens.update(t.strip().lower() for t in value.split(b","))
                    else:
                        conn_tokens.add(value.strip().lower())
                elif name == b"content-length":
                    has_len = True
                elif name == b"transfer-encoding":
                    chunked = True
        self.resp_keep_alive = parser.should_keep_alive()
        informational = 100 <= status < 200
        if ex.rs is not None and not informational and ex.rs.on_head(ex, status, self):
            # retried: this response is not forwarded; read it to its end (or close)
            self.ex = self.server = None
            if ex.upstream is self:
                ex.upstream = None
            if (has_len or chunked) and ex.method != b"HEAD" and self.resp_keep_alive and ex.body_done:
                self.draining = True
            else:
                self.close()
            return
        route = ex.route
        if route is not None and route.response_headers is not None and not informational:
            # ResponseHeaderModifier; the framing headers are the upstream's, never modified
            headers = modify_headers(route.response_headers, [h for h in headers if h[0] not in FRAMING]) \
                + [h for h in headers if h[0] in FRAMING]
        parts = [b"HTTP/1.1 %d " % status, reason or REASONS.get(status, b"Unknown"), b"\r\n"]
        if conn_tokens is None:
            for name, value in headers:
                if name not in HOP_BY_HOP:
                    parts += [name, b": ", value, b"\r\n"]
        else:
            for name, value in headers:
                if name not in HOP_BY_HOP and name not in conn_tokens:
                    parts += [name, b": ", value, b"\r\n"]
        bodyless = informational or status in (204, 304) or ex.method == b"HEAD"
        if not informational:
            ex.status = status
            ex.resp_started = True
            ex.resp_at = perf_counter()
            if not bodyless and not has_len:
                if chunked:
                    # an HTTP/1.0 client cannot read chunked: de-chunk and end the body by closing
                    self.resp_chunked = ex.version == "1.1"
                    ex.keep_alive = ex.keep_alive and self.resp_chunked
                else:
                    self.resp_until_close = True
                    self.resp_chunked = ex.version == "1.1"
                if self.resp_chunked:
                    parts.append(b"transfer-encoding: chunked\r\n")
            if not ex.keep_alive or server.closing and not server.queue or self.resp_until_close and not self.resp_chunked:
                parts.append(b"connection: close\r\n")
                ex.keep_alive = False
        parts.append(b"\r\n")
        server.send(ex, b"".join(parts))
        if ex.method == b"HEAD" and not informational:
            self._end(ex, server)
            # llhttp does not know this response has no body: start a fresh parser.
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        server = self.server
        if server is None:
            return
        ex = self.ex
        if ex is not None and ex.tap is not None:
            ex.resp_bytes += len(data)
        if ex is None:
            return
        if self.resp_chunked:
            server.send(ex, b"%x\r\n%b\r\n" % (len(data), data))
        else:
            server.send(ex, data)

    def on_message_complete(self) -> None:
        ex, server = self.ex, self.server
        if ex is None or server is None:
            if self.draining and not 100 <= self.parser.get_status_code() < 200:
                self.draining = False
                self.ex = None
                if self.parser.should_keep_alive():
                    self._next()
                else:
                    self.close()
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            return  # an interim response; the final one follows
        if self.resp_chunked:
            server.send(ex, b"0\r\n\r\n")
        self._end(ex, server)

    def _end(self, ex: Exchange, server: ServerConn) -> None:
        self.ex = self.server = None
        reusable = self.resp_keep_alive and ex.body_done and not self.resp_until_close
        if self.paused:
            self.paused.clear()
            if not self.closed:
                self.transport.resume_reading()
        if reusable:
            self._next()
        else:
            self.close()
        server.finish(ex)

    def _next(self) -> None:
        """The response in flight ended: the next pipelined exchange's turn, or the pool."""
        if not self.pipe:
            self.pool.release(self)
            return
        self.ex, server = self.pipe.popleft()
        self.server = server
        self.resp_chunked = self.resp_until_close = False
        self.resp_keep_alive = True
        self.since = self.ex.start
        if server is None:   # its client left: read the response and discard it
            self.draining = True
        elif self.corked is not None and server.out is None:
            server.cork()
            self.corked.append(server)


class Pipelining:
    """HTTP/1.1 pipelining between our own proxies (``MESH_PIPELINE_*``).

    Once ``after`` connections to an endpoint are busy, a bodiless GET is sent behind the
    request in flight on the least deep busy connection (at most ``depth`` per connection)
    whose response in flight started less than ``max_age`` seconds ago, instead of on one
    more connection. Many requests then share one TLS record and one write on each side;
    the inbound proxy forwards them at once and answers in order."""

    __slots__ = ("depth", "after", "max_age")

    def __init__(self, depth: int = 16, after: int = 2, max_age: float = 0.010) -> None:
        self.depth, self.after, self.max_age = depth, after, max_age

    @staticmethod
    def from_env(env: Mapping[str, str]) -> "Pipelining":
        def number(name: str, default: str) -> float:
            text = (env.get(name) or default).strip()
            if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) < 1:
                raise ValueError(f"{name}={text!r}: want a whole number >= 1")
            return int(text)
        return Pipelining(int(number("MESH_PIPELINE_DEPTH", "16")), int(number("MESH_PIPELINE_AFTER", "2")),
                          number("MESH_PIPELINE_MAX_AGE_MS", "10") / 1000.0)


NO_PIPELINING = Pipelining(depth=1)


class Pool:
    """Idle keep-alive connections to one upstream address."""

    def __init__(self, loop: asyncio.AbstractEventLoop, connect: Any, retry: Any,
                 max_idle: int = 128, idle_timeout: float = 60.0,
                 pipelining: "Pipelining | None" = None) -> None:
        self.loop = loop
        self._connect = connect          # async () -> UpstreamConn
        self.router_retry = retry        # (server, ex) -> None
        self.idle: list[UpstreamConn] = []
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.active = 0
        p = pipelining or NO_PIPELINING
        self.depth, self.after, self.max_age = p.depth, p.after, p.max_age
        self.busy: list[UpstreamConn] = []   # carrying exchanges (only when depth > 1)

    def pipeline_target(self) -> UpstreamConn | None:
        """A busy connection to pipeline one more GET on, once ``after`` connections are
        busy: one whose response in flight is young (never behind a slow one) and not too
        deep; the one already holding heads to write in this loop iteration, else the least
        deep."""
        busy = self.busy
        if len(busy) < self.after:
            return None
        best = None
        oldest = perf_counter() - self.max_age
        depth = self.depth - 1
        for up in busy:
            n = len(up.pipe)
            if up.pipelinable and up.since >= oldest and n < depth and not up.closed:
                if up.wout is not None:
                    return up   # heads are waiting to be written there: join them (one record)
                if best is None or n < len(best.pipe):
                    best = up
        return best

    def take(self) -> UpstreamConn | None:
        idle = self.idle
        while idle:
            up = idle.pop()
            if not up.closed:
                up.reused = True
                return up
        return None

    async def connect(self) -> UpstreamConn:
        return await self._connect(self)

    def release(self, up: UpstreamConn) -> None:
        if self.busy:
            try:
                self.busy.remove(up)
            except ValueError:
                pass
        if up.closed:
            return
        if len(self.idle) >= self.max_idle:
            up.close()
            return
        up.idle_since = self.loop.time()
        self.idle.append(up)

    def discard(self, up: UpstreamConn) -> None:
        for conns in (self.idle, self.busy):
            try:
                conns.remove(up)
            except ValueError:
                pass  # not idle: it was carrying an exchange

    def sweep(self, now: float) -> None:
        for up in [u for u in self.idle if now - u.idle_since > self.idle_timeout]:
            up.close()

    def close_all(self) -> None:
        for up in list(self.idle):
            up.close()


class TunnelPeer(asyncio.Protocol):
    """The far side of a CONNECT tunnel: bytes go straight back to the ServerConn.

    With ``handshake`` set, the first bytes are the peer proxy's answer to our CONNECT:
    the future gets its status code and any bytes after the head wait for ``splice()``."""

    def __init__(self, server: ServerConn, handshake: bool = False) -> None:
        self.server = server
        self.transport: Any = None
        self.buffer = b""
        self.spliced = False
        self.handshake: asyncio.Future[int] | None = \
            asyncio.get_running_loop().create_future() if handshake else None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        if self.spliced:
            self.server.write(data)
            return
        self.buffer += data
        hs = self.handshake
        if hs is not None and not hs.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 8192:
                    hs.set_result(0)
                return
            line = self.buffer.split(b"\r\n", 1)[0].split(b" ")
            code = parse_digits(line[1]) if len(line) > 1 else None
            self.buffer = self.buffer[end + 4:]
            hs.set_result(code or 0)

    def splice(self) -> None:
        self.spliced = True
        if self.buffer:
            self.server.write(self.buffer)
            self.buffer = b""

    def eof_received(self) -> bool | None:
        self.server.transport.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        hs = self.handshake
        if hs is not None and not hs.done():
            hs.set_result(0)
        if not self.server.transport.is_closing():
            self.server.transport.close()

    def pause_writing(self) -> None:
        self.server.pause("upstream")

    def resume_writing(self) -> None:
        self.server.resume("upstream")
