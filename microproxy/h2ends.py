"""The two kinds of HTTP/2 connection the proxy holds: ``H2ServerConn`` (a client's
connection to one of our listeners) and ``H2ClientConn`` (our pooled connection to a peer
proxy or the app, in an ``H2Pool``). The theory of operation is in h2conn.py."""
from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import Any

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RequestReceived, ResponseReceived
from h2.exceptions import ProtocolError

from . import clock, grpc
from .core import retry
from .core.breaker import ADMIT
from .core.routing import modify_headers
from .h2conn import (MAX_CONCURRENT_STREAMS, MAX_HEADERS, MAX_STREAMS_PER_CONN,
                     RAPID_RESET_MIN_STREAMS, RAPID_RESET_WINDOW, H2Conn)
from .h2stream import H2Exchange, Half, clean_headers

log = logging.getLogger(__name__)


class H2ServerConn(H2Conn):
    """A client's HTTP/2 connection to one of our listeners (replaces its ServerConn)."""

    client_side = False

    def __init__(self, router: Any, old: Any) -> None:
        super().__init__(old.loop)
        self.router = router
        self.metrics = old.metrics
        self.registry = old.registry
        self.direction = old.direction
        self.tls = old.tls
        self.peer_id = old.peer_id
        self.tcp_key = old.tcp_key
        self.cache: dict[bytes, Any] = {}
        self.tunnel_peer = None
        self._in_head = False
        self.closing = False
        self.opened = 0
        self.rapid_resets = 0

    @property
    def active(self) -> Any:   # the idle sweep skips connections with streams in flight
        return True if self.streams else None

    def adopt(self, transport: Any) -> None:
        self.transport = transport
        self.registry.add(self)
        self.start_h2()

    def graceful_close(self) -> None:
        self.closing = True
        if not self.streams:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.discard(self)
        self.metrics.tcp_closed(self.tcp_key, self.read_bytes, self.written)
        for half in list(self.streams.values()):
            x = half.x
            if x is not None and not x.done:
                x.router.finish(x, "client disconnected")
        super().connection_lost(exc)

    def on_request(self, ev: RequestReceived) -> None:
        sid = ev.stream_id
        if self.closing:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        self.opened += 1
        half = Half(self, sid, None)
        x = H2Exchange(half, ev.headers, self.router)
        half.x = x
        half.early = []
        self.streams[sid] = half
        if ev.stream_ended is not None:
            half.rx_done = True
            half.early.append(("e",))
        ctype = None
        for name, value in ev.headers:
            if name == b"content-type":
                ctype = value
        x.grpc = grpc.is_grpc(ctype)
        if len(ev.headers) > MAX_HEADERS:
            self.router.fail(x, 431, "too many headers")
            return
        self.router.dispatch(self, x)

    def remote_reset(self, half: Half, code: int) -> None:
        x = half.x
        if not half.headers_sent and clock.monotonic() - half.opened_at < RAPID_RESET_WINDOW:
            self.rapid_resets += 1
            if self.opened >= RAPID_RESET_MIN_STREAMS and self.rapid_resets * 2 > self.opened:
                self.calm_down("rapid reset")
        if x is not None and not x.done:
            x.router.finish(x, "client reset")
        super().remote_reset(half, code)

    def stream_dropped(self, half: Half) -> None:
        if self.closing and not self.streams:
            self.transport.close()

    def stream_broken(self, half: Half) -> None:
        x = half.x
        if x is not None and not x.done:
            if x.status == 0 and x.policy is not None and x.router.retry(x, None, None):
                return   # no answer came: retried like a connection error
            x.router.fail(x, 502, "upstream connection lost")
        else:
            super().stream_broken(half)


class H2ClientConn(H2Conn):
    """Our multiplexed HTTP/2 connection to a peer proxy (mTLS, ALPN h2) or the app (h2c)."""

    client_side = True

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: "H2Pool") -> None:
        super().__init__(loop)
        self.pool = pool
        self.opened = 0
        self.goaway = False
        self.idle_since = loop.time()   # when its last stream ended (H2Pool.sweep)
        self.on_close: Any = None       # () -> None once it is gone (per-service connection count)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.start_h2()

    def usable(self) -> bool:
        return (not self.closed and not self.goaway and self.opened < MAX_STREAMS_PER_CONN
                and len(self.streams) < min(self.h2.remote_settings.max_concurrent_streams,
                                            MAX_CONCURRENT_STREAMS))

    def open(self, down: Half, headers: list[tuple[bytes, bytes]], end: bool) -> Half:
        sid = self.h2.get_next_available_stream_id()
        up = Half(self, sid, down.x)
        self.streams[sid] = up
        self.opened += 1
        up.send_headers(headers, end)
        return up

    def on_response(self, ev: ResponseReceived) -> None:
        half = self.streams.get(ev.stream_id)
        if half is None:
            return
        x = half.x
        status = 0
        gs = None
        for name, value in ev.headers:
            if name == b":status":
                status = int(value) if value.isdigit() else 0
            elif name == b"grpc-status":
                gs = grpc.parse_status(value)
        if 100 <= status < 200:
            return   # interim responses are not forwarded
        end = ev.stream_ended is not None
        if x is not None and x.policy is not None and retry.is_retryable(x.policy, status, gs if end else None) \
                and x.router.retry(x, status, gs if end else None):
            return   # retried: this response is not forwarded (a failure known from its head)
        if x is not None:
            x.status = status
            x.resp_at = perf_counter()
            if end:
                x.grpc_status = gs
        peer = half.peer
        if peer is not None:
            headers = clean_headers(ev.headers)
            mod = x.route.response_headers if x is not None and x.route is not None else None
            if mod is not None:   # the route's ResponseHeaderModifier (outbound); framing stays
                headers = modify_headers(mod, [h for h in headers if h[0] != b"content-length"]) \
                    + [h for h in headers if h[0] == b"content-length"]
            peer.send_headers(headers, end)
            peer.conn.flush()

    def got_trailers(self, half: Half, trailers: list[tuple[bytes, bytes]]) -> None:
        x = half.x
        if x is not None:
            for name, value in trailers:
                if name == b"grpc-status":
                    x.grpc_status = grpc.parse_status(value)

    def stream_ended(self, half: Half) -> None:
        x = half.x
        if x is not None and not x.done:
            x.router.finish(x, None)

    def remote_reset(self, half: Half, code: int) -> None:
        x = half.x
        if x is not None and not x.done:
            if x.status == 0:
                if x.policy is not None and x.router.retry(x, None, None):
                    return   # no response: retried like a connection error
                x.router.fail(x, 502, f"upstream reset the stream ({code})")
                return
            x.router.finish(x, "upstream reset")
        super().remote_reset(half, code)

    def stream_dropped(self, half: Half) -> None:
        if self.streams:
            return
        self.idle_since = self.loop.time()
        if self.goaway or self.opened >= MAX_STREAMS_PER_CONN:
            self.transport.close()

    def stream_broken(self, half: Half) -> None:
        x = half.x
        if x is not None and not x.done:
            x.router.finish(x, "client went away")
        super().stream_broken(half)

    def on_goaway(self, ev: ConnectionTerminated) -> None:
        self.goaway = True
        self.pool.discard(self)
        # h2 cannot send on any stream after GOAWAY: fail what is in flight
        for half in list(self.streams.values()):
            x = half.x
            self.streams.pop(half.sid, None)
            if x is not None and not x.done:
                if x.status == 0 and x.policy is not None and x.router.retry(x, None, None):
                    continue   # not answered: retried on another connection
                x.router.fail(x, 503, "upstream connection going away")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        super().connection_lost(exc)


class Overflow(ConnectionError):
    """A new connection would pass the service's connection limit."""


class H2Pool:
    """Multiplexed connections to one endpoint: one, more only when it is full."""

    def __init__(self, connect: Any, idle_timeout: float = 60.0) -> None:
        self._connect = connect      # async (pool) -> H2ClientConn
        self.idle_timeout = idle_timeout
        self.conns: list[H2ClientConn] = []
        self.connecting: asyncio.Future[H2ClientConn] | None = None

    def take(self) -> H2ClientConn | None:
        for c in self.conns:
            if c.usable():
                return c
        return None

    async def get(self, admission: Any = None) -> H2ClientConn:
        """A usable connection, dialled if none is. A new one counts against ``admission``
        (the per-service connection limit of the stream that asked: ``Overflow`` over it)."""
        for _ in range(4):
            c = self.take()
            if c is not None:
                return c
            if self.connecting is None:
                if admission is not None:
                    verdict = admission.connect()
                    if verdict is not ADMIT:
                        raise Overflow(verdict.reason)
                self.connecting = asyncio.ensure_future(self._dial(admission))
            await asyncio.shield(self.connecting)
        c = self.take()
        if c is None:
            raise ConnectionError("no usable HTTP/2 connection")
        return c

    async def _dial(self, admission: Any = None) -> H2ClientConn:
        try:
            c: H2ClientConn = await self._connect(self)
        except BaseException:
            if admission is not None:
                admission.connection_done()
            raise
        finally:
            self.connecting = None
        if admission is not None:
            c.on_close = admission.connection_done
        self.conns.append(c)
        return c

    def discard(self, c: H2ClientConn) -> None:
        try:
            self.conns.remove(c)
        except ValueError:
            pass  # already gone

    def sweep(self, now: float) -> None:
        """Close the connections with no stream for longer than ``idle_timeout`` (GOAWAY
        first: the peer sees a clean end, not a reset)."""
        for c in [c for c in self.conns if not c.streams and now - c.idle_since > self.idle_timeout]:
            self.discard(c)
            c.goaway = True
            try:
                c.h2.close_connection()
                c.flush()
            except ProtocolError:
                pass  # the connection is already closing: just close it
            c.transport.close()
