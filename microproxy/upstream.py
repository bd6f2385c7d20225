"""The upstream side of HTTP/1.1 proxying: ``UpstreamConn`` (our connection to a peer proxy
or the local app), ``Pool`` (idle and busy connections to one address) and ``Pipelining``
(HTTP/1.1 pipelining between our own proxies). See http1.py for the theory of operation."""
from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from collections.abc import Mapping
from http import HTTPStatus
from time import perf_counter
from typing import TYPE_CHECKING, Any

import httptools

from .core.routing import modify_headers
from .http1 import CONNECTION_OPTIONS, FRAMING, HIGH_WATER, HOP_BY_HOP, LOW_WATER, Exchange

if TYPE_CHECKING:
    from .downstream import ServerConn

log = logging.getLogger(__name__)

NOT_COPIED = HOP_BY_HOP | FRAMING            # response headers not copied through as they come
STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}


def status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d Unknown\r\n" % status


def serialize(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """``[(name, value)]`` -> the flat ``[name, b": ", value, b"\\r\\n", ...]`` of a head."""
    out: list[bytes] = []
    for name, value in headers:
        out += (name, b": ", value, b"\r\n")
    return out


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
        self._hdr: list[bytes] = []                        # the response head so far, serialized
        self._special: list[tuple[bytes, bytes]] = []      # its framing and hop-by-hop headers
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
        self.write_paused: ServerConn | None = None   # the client paused while our writes back up

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
        server = self.server
        if server is not None:
            self.write_paused = server   # resumed even if another exchange is in flight by then
            server.pause("upstream")

    def resume_writing(self) -> None:
        server, self.write_paused = self.write_paused, None
        if server is not None:
            server.resume("upstream")

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
        if server.write_blocked and server.active is ex:
            self.pause("downstream")   # the client is not reading what it was sent so far
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
            self._unpause()   # paused for that client's sake: the others must not wait
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

    # --- httptools callbacks. No on_message_begin: the head's state is taken, and reset, when
    # the head is complete. No on_status: the reason phrase is the status code's own (as
    # Linkerd's proxy writes it). Each header is serialized as it arrives, except the framing
    # and hop-by-hop ones, which on_headers_complete looks at: one pass, one call less.
    def on_header(self, name: bytes, value: bytes) -> None:
        low = name.lower()
        if low in NOT_COPIED:
            self._special.append((low, value))
        else:
            self._hdr += (low, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        hdr, special = self._hdr, self._special
        self._hdr = []
        if special:
            self._special = []
        ex, server = self.ex, self.server
        if ex is None or server is None:
            return
        parser = self.parser
        status = parser.get_status_code()
        drop: set[bytes] | None = None
        has_len = False
        chunked = False
        length = b""
        for name, value in special:
            if name == b"content-length":
                has_len = True
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"connection" and value.lower() not in CONNECTION_OPTIONS:
                for t in value.split(b","):
                    t = t.strip().lower()
                    if t not in CONNECTION_OPTIONS:
                        if drop is None:
                            drop = set()
                        drop.add(t)
        if drop is not None:   # Connection names more headers to drop (RFC 9110 §7.6.1)
            hdr = [x for i in range(0, len(hdr), 4) if hdr[i] not in drop for x in hdr[i:i + 4]]
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
            # ResponseHeaderModifier. The framing is the upstream's and hop-by-hop headers are
            # never forwarded, whatever the route sets or adds (nor those Connection named).
            modified = modify_headers(route.response_headers,
                                      [(hdr[i], hdr[i + 2]) for i in range(0, len(hdr), 4)])
            hdr = serialize([(name, value) for name, value in ((n.lower(), v) for n, v in modified)
                             if name not in NOT_COPIED and (drop is None or name not in drop)])
        if has_len:
            hdr += (b"content-length: ", length, b"\r\n")
        if not informational:
            ex.status = status
            ex.resp_started = True
            ex.resp_at = perf_counter()
            if not has_len and not (status == 204 or status == 304 or ex.method == b"HEAD"):
                if chunked:
                    # an HTTP/1.0 client cannot read chunked: de-chunk and end the body by closing
                    self.resp_chunked = ex.version == "1.1"
                    ex.keep_alive = ex.keep_alive and self.resp_chunked
                else:
                    self.resp_until_close = True
                    self.resp_chunked = ex.version == "1.1"
                if self.resp_chunked:
                    hdr.append(b"transfer-encoding: chunked\r\n")
            if not ex.keep_alive or server.closing and not server.queue or self.resp_until_close and not self.resp_chunked:
                hdr.append(b"connection: close\r\n")
                ex.keep_alive = False
        hdr.append(b"\r\n")
        server.send(ex, (STATUS_LINES.get(status) or status_line(status)) + b"".join(hdr))
        if ex.method == b"HEAD" and not informational:
            self._end(ex, server)
            # llhttp does not know this response has no body: start a fresh parser.
            self.parser = httptools.HttpResponseParser(self)

    def on_body(self, data: bytes) -> None:
        server = self.server
        ex = self.ex
        if server is None or ex is None:
            return
        if ex.tap is not None:
            ex.resp_bytes += len(data)
        if self.resp_chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        server.send(ex, data)

    def on_message_complete(self) -> None:
        if self._hdr or self._special:   # trailer fields (on_header after the head): dropped,
            self._hdr, self._special = [], []   # never the next response's headers
        ex, server = self.ex, self.server
        if ex is None or server is None:
            if self.draining and not 100 <= self.parser.get_status_code() < 200:
                self.draining = False
                self.ex = None
                self._unpause()   # a pause for the client of the discarded response is over
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
        self._unpause()
        if reusable:
            self._next()
        else:
            self.close()
        server.finish(ex)

    def _unpause(self) -> None:
        """Drop every reason to stop reading: the only one is the client of the exchange that
        ended or left ("downstream"); the next exchange's client re-applies its own in _next."""
        if self.paused:
            self.paused.clear()
            if not self.closed:
                self.transport.resume_reading()

    def _next(self) -> None:
        """The response in flight ended: the next pipelined exchange's turn, or the pool."""
        if not self.pipe:
            self.pool.release(self)
            return
        self.ex, server = self.pipe.popleft()
        self.server = server
        self.reused = True   # its request was sent on a live connection: safe to resend once
        self.resp_chunked = self.resp_until_close = False
        self.resp_keep_alive = True
        self.since = self.ex.start
        if server is None:   # its client left: read the response and discard it
            self.draining = True
            return
        if server.write_blocked and server.active is self.ex:
            self.pause("downstream")   # its client's pause_writing came while it waited its turn
        if self.corked is not None and server.out is None:
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
        def number(name: str, default: str) -> int:
            text = (env.get(name) or default).strip()
            if not re.fullmatch(r"[0-9]{1,6}", text) or int(text) < 1:
                raise ValueError(f"{name}={text!r}: want a whole number >= 1")
            return int(text)
        return Pipelining(number("MESH_PIPELINE_DEPTH", "16"), number("MESH_PIPELINE_AFTER", "2"),
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
        p = pipelining or NO_PIPELINING
        self.depth, self.after, self.max_age = p.depth, p.after, p.max_age
        self.busy: list[UpstreamConn] = []   # carrying exchanges (only when depth > 1)

    def pipeline_target(self) -> UpstreamConn | None:
        """A busy connection to pipeline one more GET on, once ``after`` connections are
        busy: one whose response in flight is young (never behind a slow one), not paused
        (never behind a client that is not reading) and not too deep; the one already holding
        heads to write in this loop iteration, else the least deep."""
        busy = self.busy
        if len(busy) < self.after:
            return None
        best = None
        oldest = perf_counter() - self.max_age
        depth = self.depth - 1
        for up in busy:
            n = len(up.pipe)
            if up.pipelinable and up.since >= oldest and n < depth and not up.closed \
                    and not up.paused:   # (paused: its client is not reading; never behind it)
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
