"""The server side of HTTP/1.1 proxying: ``ServerConn`` (a client's connection to one of
our listeners) and ``TunnelPeer`` (the far side of a CONNECT tunnel). See http1.py for the
theory of operation."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, Any

import httptools

from .http1 import (HIGH_WATER, LOW_WATER, MAX_CONCURRENT, MAX_HEAD_BYTES, MAX_HEADERS, Exchange,
                    Reject, Router, check_head, error_response, parse_digits)
from .metrics import labels
from .observe import TapHub
from .tls import peer_identity

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)


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
        self.write_blocked = False   # our write buffer is over its high-water mark
        self.debug = log.isEnabledFor(logging.DEBUG)   # access-log every request (read once)
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
        self.write_blocked = True
        self._hold_writers(True)

    def resume_writing(self) -> None:
        self.write_blocked = False
        self._hold_writers(False)

    def _hold_writers(self, hold: bool) -> None:
        """Stop (or resume) reading what is written to us: the response being written, and
        a tunnel's far side. Only when the upstream connection is reading *our* response:
        on a connection shared by pipelining, a response ahead of ours belongs to another
        client; ours pauses it when its turn comes (UpstreamConn._next checks write_blocked)."""
        ex = self.active
        if ex is not None:
            up = ex.upstream
            if up is not None and up.ex is ex:
                if hold:
                    up.pause("downstream")
                else:
                    up.resume("downstream")
        peer = self.tunnel_peer
        if peer is not None:
            if hold:
                peer.pause_reading()
            else:
                peer.resume_reading()

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
        if not self._in_head:
            return   # a chunked body's trailer fields: not forwarded (the body ends with 0\r\n\r\n)
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
        if ex.flag or self.debug:
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
            if not nxt.done and nxt.upstream is not None:
                # its held response may have paused its upstream; now it is written directly,
                # paused only while our own write buffer is full (before the write, which may
                # pause it again)
                if self.write_blocked:
                    nxt.upstream.pause("downstream")
                else:
                    nxt.upstream.resume("downstream")
            if buf:
                self.write(b"".join(buf))
            if not nxt.done:
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
                if ex.upstream is not None:   # (drop: never cut others pipelined on it)
                    ex.upstream.drop(ex)
                    ex.upstream = None
                ex.status = status
                self.write(error_response(status, reason, close=True))
                self.finish(ex, reusable=False, close=True)
                return
            # the broken request is pipelined behind one in flight: drop the connection
            self.transport.abort()
            return
        self.write(error_response(status, reason, close=True))
        self.flush()   # with responses held for a deferred write, they go first
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
            self.flush()   # responses held for a deferred write are not lost
            self.transport.close()


OK_CONNECT = b"HTTP/1.1 200 Connection Established\r\n\r\n"


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
