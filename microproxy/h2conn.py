"""HTTP/2 connections for the proxy, on the ``h2`` library: the two ends of a proxied
stream (``Half``), the connection protocols (``H2ServerConn``: a client's connection to us;
``H2ClientConn``: our pooled connection to a peer proxy or the app) and ``H2Pool``. What
to do with a stream (routing, balancing, metrics) is h2proxy.py's.

Theory of operation
-------------------
A request stream is a pair of ``Half`` s: the downstream half (on the client's connection)
and the upstream half (on a pooled ``H2ClientConn``), joined by an ``H2Exchange``. Events
from h2 on one connection act on the *peer* halves: DATA, trailers, END_STREAM and
RST_STREAM are forwarded as they arrive. Before the upstream half exists (the endpoint is
being resolved or dialled), what the client sends waits in ``Half.early``, bounded by the
stream window because none of it is acknowledged yet.

Flow control (STYLE.md rule 5). DATA received on a half is forwarded at once to its peer
half; the bytes are *acknowledged* (WINDOW_UPDATE) only when the peer half has handed them
to its transport (they fitted in the far side's flow-control window) and that transport is
not above its high-water mark. Until then the sender's window stays closed, so a slow reader
stops its writer after one window (64 KiB per stream, 1 MiB per connection) instead of
making the proxy buffer. A connection whose own write buffer is above high water (a peer
that does not read) stops being read. Cross-connection backpressure is by withheld
WINDOW_UPDATEs, never by pausing a shared connection: that would stall every other stream
multiplexed on it.

Limits (Envoy's defaults, REFERENCE-hardening.md §1): 100 concurrent streams per
connection, 60 KiB header lists and 100 headers, rapid-reset protection (a connection
whose client resets more than half of >= 100 streams within 1 s of opening them is closed
with GOAWAY ENHANCE_YOUR_CALM), and a cap on control frames (PING, SETTINGS, empty DATA)
per second. h2 keeps the ids of closed streams; we keep 1024 per connection, not 65,536
(PERF-LAB.md saw RSS grow 25 -> 62 MB), and retire a pooled connection after 10,000 streams.

"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from time import perf_counter
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (ConnectionTerminated, DataReceived, PingReceived, RemoteSettingsChanged,
                       RequestReceived, ResponseReceived, StreamEnded, StreamReset,
                       TrailersReceived, WindowUpdated)
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError

from . import clock, grpc

log = logging.getLogger(__name__)

HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
CONN_WINDOW = 1024 * 1024          # connection receive window (stream windows stay 64 KiB)
MAX_CONCURRENT_STREAMS = 100
MAX_HEADER_LIST = 60 * 1024
MAX_HEADERS = 100
MAX_STREAMS_PER_CONN = 10000       # pooled client connections are retired after this many
RAPID_RESET_MIN_STREAMS = 100
RAPID_RESET_WINDOW = 1.0           # a reset this soon after the stream opened counts as rapid
CONTROL_FRAMES_PER_SEC = 200
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"upgrade", b"http2-settings", b"proxy-authorization",
                        b"proxy-authenticate"))


class _H2(H2Connection):
    MAX_CLOSED_STREAMS = 1024
    DEFAULT_MAX_HEADER_LIST_SIZE = MAX_HEADER_LIST


def clean_headers(headers: list[tuple[bytes, bytes]], drop: frozenset[bytes] = frozenset()) -> list[tuple[bytes, bytes]]:
    out = []
    for h in headers:   # keep h2's HeaderTuple objects (never-indexed stays never-indexed)
        name = h[0]
        if name in HOP_BY_HOP or name in drop:
            continue
        if name == b"te" and h[1].strip().lower() != b"trailers":
            continue
        out.append(h)
    return out


class H2Exchange:
    """One request stream through the proxy: what routing, balancing and metrics need."""

    __slots__ = ("down", "up", "start", "resp_at", "status", "grpc", "grpc_status", "done",
                 "metric_key", "lb", "authority", "headers", "timer", "flag", "router", "tap",
                 "resp_bytes", "method", "endpoint", "span")

    def __init__(self, down: "Half", headers: list[tuple[bytes, bytes]], router: Any) -> None:
        self.down = down
        self.up: Half | None = None
        self.start = perf_counter()
        self.resp_at = 0.0
        self.status = 0
        self.grpc = False
        self.grpc_status: int | None = None
        self.done = False
        self.metric_key = ""
        self.lb: Any = None
        self.authority = ""
        self.headers = headers
        self.timer: Any = None
        self.flag = ""
        self.router = router
        self.tap: Any = None          # a TapHub handle when someone taps this stream
        self.resp_bytes = 0           # response DATA bytes, counted only while tapped
        self.method = b""             # for tracing (set by the router when it traces)
        self.endpoint: Any = None     # outbound: the discovery.Endpoint picked
        self.span: Any = None         # a tracing.Span when this stream is traced

    def pseudo(self, name: bytes) -> bytes:
        """A request pseudo-header's value (``:method``, ``:path``, ...), b"" when absent."""
        for n, v in self.headers:
            if n == name:
                return v
        return b""


class Half:
    """One side of a stream on one connection. ``peer`` is the other side."""

    __slots__ = ("conn", "sid", "peer", "x", "outq", "out_end", "out_trailers", "unacked",
                 "rx_done", "tx_done", "headers_sent", "early", "opened_at")

    def __init__(self, conn: "H2Conn", sid: int, x: H2Exchange | None) -> None:
        self.conn = conn
        self.sid = sid
        self.peer: Half | None = None
        self.x = x
        self.outq: deque[bytes] = deque()     # DATA waiting for the far side's window
        self.out_end = False                  # END_STREAM to send once outq is empty
        self.out_trailers: list[tuple[bytes, bytes]] | None = None
        self.unacked = 0                      # received here, not yet handed back as window
        self.rx_done = False                  # the remote side ended (END_STREAM) its message
        self.tx_done = False                  # we sent END_STREAM
        self.headers_sent = False
        self.early: list[Any] | None = None   # ("d", bytes) / ("t", trailers) / ("e",) before peer exists
        self.opened_at = clock.monotonic()

    # --- sending (this half's connection is the writer)
    def send_headers(self, headers: list[tuple[bytes, bytes]], end: bool = False) -> None:
        h2 = self.conn.h2
        try:
            h2.send_headers(self.sid, headers, end_stream=end)
        except (ProtocolError, StreamClosedError) as e:
            log.info("h2 send headers failed", extra={"error": repr(e)})
            self.fail_local()
            return
        self.headers_sent = True
        if end:
            self.tx_done = True
            self.check_closed()

    def send_data(self, data: bytes) -> None:
        if self.tx_done or self.out_end or self.out_trailers is not None:
            return
        if data:
            self.outq.append(data)
        self.drain()

    def send_end(self) -> None:
        if self.tx_done or self.out_end or self.out_trailers is not None:
            return
        self.out_end = True
        self.drain()

    def send_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.tx_done or self.out_end or self.out_trailers is not None:
            return
        self.out_trailers = trailers
        self.drain()

    def drain(self) -> None:
        """Send what the flow-control windows allow; then END_STREAM/trailers if all is out."""
        if self.tx_done:
            return
        h2 = self.conn.h2
        outq = self.outq
        try:
            while outq:
                window = h2.local_flow_control_window(self.sid)
                if window <= 0:
                    return
                chunk = outq[0]
                n = min(window, len(chunk), h2.max_outbound_frame_size)
                if n < len(chunk):
                    h2.send_data(self.sid, chunk[:n])
                    outq[0] = chunk[n:]
                else:
                    h2.send_data(self.sid, chunk)
                    outq.popleft()
            if self.out_trailers is not None:
                h2.send_headers(self.sid, self.out_trailers, end_stream=True)
                self.tx_done = True
            elif self.out_end:
                h2.end_stream(self.sid)
                self.tx_done = True
        except (ProtocolError, StreamClosedError, FlowControlError) as e:
            log.info("h2 send failed", extra={"error": repr(e)})
            self.fail_local()
            return
        finally:
            self.conn.dirty = True
        if self.tx_done:
            self.check_closed()

    def release(self) -> None:
        """Hand the window back to our peer's sender once our writes went out (rule 5)."""
        if self.outq or self.conn.write_paused:
            return
        p = self.peer
        if p is not None and p.unacked:
            p.conn.ack(p.sid, p.unacked)
            p.unacked = 0

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        if self.rx_done and self.tx_done:
            return
        try:
            self.conn.h2.reset_stream(self.sid, code)
        except (ProtocolError, StreamClosedError):
            pass  # already closed on the wire
        self.conn.dirty = True
        self.rx_done = self.tx_done = True
        self.outq.clear()
        self.check_closed()

    def fail_local(self) -> None:
        """This stream cannot continue here (it was closed under us): tear the pair down."""
        self.outq.clear()
        self.rx_done = self.tx_done = True
        self.check_closed()
        p = self.peer
        if p is not None and not (p.rx_done and p.tx_done):
            p.conn.stream_broken(p)

    def check_closed(self) -> None:
        if self.rx_done and self.tx_done:
            self.conn.drop(self)


class H2Conn(asyncio.Protocol):
    """What both ends share: the h2 state machine, event dispatch, flow control, flood caps."""

    client_side = False

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        cfg = H2Configuration(client_side=self.client_side, header_encoding=None,
                              validate_inbound_headers=True, validate_outbound_headers=True)
        self.h2 = _H2(config=cfg)
        self.transport: Any = None
        self.streams: dict[int, Half] = {}
        self.write_paused = False
        self.closed = False
        self.dirty = False
        self.read_bytes = 0
        self.written = 0
        self.last_active = loop.time()
        self.ctl_sec = 0
        self.ctl_count = 0

    def start_h2(self) -> None:
        self.transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONN_WINDOW - 65535)
        self.flush()

    def flush(self) -> None:
        self.dirty = False
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.written += len(data)
            self.transport.write(data)

    def ack(self, sid: int, n: int) -> None:
        try:
            self.h2.acknowledge_received_data(n, sid)
        except (ProtocolError, StreamClosedError):
            return  # the connection is going away
        self.flush()

    # --- asyncio.Protocol
    def data_received(self, data: bytes) -> None:
        self.read_bytes += len(data)
        self.last_active = self.loop.time()
        try:
            events: list[Any] = self.h2.receive_data(data)   # dispatched on type() below
        except ProtocolError as e:
            log.info("h2 protocol error", extra={"error": repr(e), "side": type(self).__name__})
            self.flush()   # the GOAWAY h2 prepared
            self.transport.close()
            return
        for ev in events:
            try:
                self.on_event(ev)
            except Exception:   # noqa: BLE001 - a bug handling one stream must not end the others
                log.exception("HTTP/2 event handling failed", extra={"event": type(ev).__name__})
                self.stream_failed(getattr(ev, "stream_id", 0) or 0)
            if self.closed:
                return
        self.flush()

    def on_event(self, ev: Any) -> None:
        t = type(ev)
        if t is DataReceived:
            self.on_data(ev)
        elif t is RequestReceived:
            self.on_request(ev)
        elif t is ResponseReceived:
            self.on_response(ev)
        elif t is StreamEnded:
            self.on_end(ev.stream_id)
        elif t is TrailersReceived:
            self.on_trailers(ev)
        elif t is WindowUpdated:
            self.on_window(ev.stream_id)
        elif t is StreamReset:
            self.on_reset(ev)
        elif t is PingReceived or t is RemoteSettingsChanged:
            self.control_frame()
        elif t is ConnectionTerminated:
            self.on_goaway(ev)

    def stream_failed(self, sid: int) -> None:
        """Handling an event of stream ``sid`` raised: that stream is reset (INTERNAL_ERROR)
        and its exchange ends as a proxy error; a connection-level event closes the
        connection."""
        half = self.streams.get(sid) if sid else None
        if half is None:
            if sid:
                try:
                    self.h2.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)
                except (ProtocolError, StreamClosedError):
                    pass
                return
            self.transport.close()
            self.closed = True
            return
        x = half.x
        if x is not None and not x.done:
            x.flag = "PE"
            try:
                x.router.finish(x, "proxy error")
            except Exception:   # noqa: BLE001 - already failing; the reset below still happens
                log.exception("HTTP/2 stream clean-up failed")
        for h in (half, half.peer):
            if h is not None:
                h.reset(ErrorCodes.INTERNAL_ERROR)
                if h.conn is not self and h.conn.dirty:
                    h.conn.flush()

    def control_frame(self) -> None:
        sec = int(self.loop.time())
        if sec != self.ctl_sec:
            self.ctl_sec, self.ctl_count = sec, 0
        self.ctl_count += 1
        if self.ctl_count > CONTROL_FRAMES_PER_SEC:
            self.calm_down("control frame flood")

    def calm_down(self, why: str) -> None:
        log.warning("closing an abusive HTTP/2 connection", extra={"reason": why})
        try:
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        except ProtocolError:
            pass  # GOAWAY already sent
        self.flush()
        self.transport.close()
        self.closed = True

    def pause_writing(self) -> None:
        self.write_paused = True
        if not self.closed:
            self.transport.pause_reading()   # a peer that does not read gets no more reads

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.closed:
            self.transport.resume_reading()
        for half in list(self.streams.values()):
            half.release()

    # --- events shared by both ends
    def on_data(self, ev: DataReceived) -> None:
        half = self.streams.get(ev.stream_id)
        n = ev.flow_controlled_length
        if half is None:
            if n:
                self.ack(ev.stream_id, n)
            return
        if not ev.data and ev.stream_ended is None:
            self.control_frame()   # empty DATA frames count as control frames (CVE-2019-9518)
        peer = half.peer
        if peer is None:
            if half.early is None:
                if n:
                    self.ack(ev.stream_id, n)   # the pair is gone (answered by the proxy)
                return
            half.unacked += n
            half.early.append(("d", ev.data))
            return
        half.unacked += n
        x = half.x
        if x is not None and x.tap is not None and half is not x.down:   # response bytes, tapped
            x.resp_bytes += len(ev.data)
        peer.send_data(ev.data)
        peer.release()
        if peer.conn.dirty:
            peer.conn.flush()

    def on_end(self, sid: int) -> None:
        half = self.streams.get(sid)
        if half is None:
            return
        half.rx_done = True
        peer = half.peer
        if peer is None:
            if half.early is not None:
                half.early.append(("e",))
        else:
            peer.send_end()
            if peer.conn.dirty:
                peer.conn.flush()
        self.stream_ended(half)
        half.check_closed()

    def on_trailers(self, ev: TrailersReceived) -> None:
        half = self.streams.get(ev.stream_id)
        if half is None:
            return
        trailers = clean_headers(ev.headers)
        self.got_trailers(half, trailers)
        peer = half.peer
        if peer is None:
            if half.early is not None:
                half.early.append(("t", trailers))
        else:
            peer.send_trailers(trailers)
            if peer.conn.dirty:
                peer.conn.flush()

    def on_window(self, sid: int) -> None:
        halves = list(self.streams.values()) if sid == 0 else \
            [h for h in (self.streams.get(sid),) if h is not None]
        for half in halves:
            if half.outq or half.out_end or half.out_trailers is not None:
                half.drain()
                half.release()

    def on_reset(self, ev: StreamReset) -> None:
        half = self.streams.get(ev.stream_id)
        if half is None:
            return
        half.rx_done = half.tx_done = True
        half.outq.clear()
        self.drop(half)
        self.remote_reset(half, ev.error_code)

    def on_goaway(self, ev: ConnectionTerminated) -> None:
        self.transport.close()

    def drop(self, half: Half) -> None:
        if self.streams.pop(half.sid, None) is None:
            return
        if half.unacked:   # hand the connection window back, the stream is gone
            n, half.unacked = half.unacked, 0
            try:
                self.h2.acknowledge_received_data(n, half.sid)
            except (ProtocolError, StreamClosedError):
                pass  # the connection is going away
            self.dirty = True
        self.stream_dropped(half)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        halves = list(self.streams.values())
        self.streams.clear()
        for half in halves:
            peer = half.peer
            if peer is not None and not (peer.rx_done and peer.tx_done):
                peer.conn.stream_broken(peer)

    # --- per end
    def on_request(self, ev: RequestReceived) -> None:
        self.h2.reset_stream(ev.stream_id, ErrorCodes.PROTOCOL_ERROR)

    def on_response(self, ev: ResponseReceived) -> None:
        half = self.streams.get(ev.stream_id)
        if half is not None:
            half.reset(ErrorCodes.PROTOCOL_ERROR)

    def stream_ended(self, half: Half) -> None:
        pass

    def got_trailers(self, half: Half, trailers: list[tuple[bytes, bytes]]) -> None:
        pass

    def remote_reset(self, half: Half, code: int) -> None:
        p = half.peer
        if p is not None:
            p.reset(code if code in (ErrorCodes.CANCEL, ErrorCodes.REFUSED_STREAM) else ErrorCodes.CANCEL)
            if p.conn.dirty:
                p.conn.flush()

    def stream_broken(self, half: Half) -> None:
        """Our peer half's connection failed under it."""
        half.reset(ErrorCodes.CANCEL)
        if self.dirty:
            self.flush()

    def stream_dropped(self, half: Half) -> None:
        pass


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
        if x is not None:
            x.status = status
            x.resp_at = perf_counter()
            if end:
                x.grpc_status = gs
        peer = half.peer
        if peer is not None:
            peer.send_headers(clean_headers(ev.headers), end)
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
                x.router.fail(x, 502, f"upstream reset the stream ({code})")
                return
            x.router.finish(x, "upstream reset")
        super().remote_reset(half, code)

    def stream_dropped(self, half: Half) -> None:
        if not self.streams and (self.goaway or self.opened >= MAX_STREAMS_PER_CONN):
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
                x.router.fail(x, 503, "upstream connection going away")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.discard(self)
        super().connection_lost(exc)


class H2Pool:
    """Multiplexed connections to one endpoint: one, more only when it is full."""

    def __init__(self, connect: Any) -> None:
        self._connect = connect      # async (pool) -> H2ClientConn
        self.conns: list[H2ClientConn] = []
        self.connecting: asyncio.Future[H2ClientConn] | None = None

    def take(self) -> H2ClientConn | None:
        for c in self.conns:
            if c.usable():
                return c
        return None

    async def get(self) -> H2ClientConn:
        for _ in range(4):
            c = self.take()
            if c is not None:
                return c
            if self.connecting is None:
                self.connecting = asyncio.ensure_future(self._dial())
            await asyncio.shield(self.connecting)
        c = self.take()
        if c is None:
            raise ConnectionError("no usable HTTP/2 connection")
        return c

    async def _dial(self) -> H2ClientConn:
        try:
            c: H2ClientConn = await self._connect(self)
            self.conns.append(c)
            return c
        finally:
            self.connecting = None

    def discard(self, c: H2ClientConn) -> None:
        try:
            self.conns.remove(c)
        except ValueError:
            pass  # already gone

    def close_idle(self) -> None:
        for c in list(self.conns):
            if not c.streams:
                c.transport.close()


