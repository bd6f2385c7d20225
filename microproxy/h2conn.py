"""HTTP/2 connections for the proxy, on the ``h2`` library. This module: ``H2Conn``, what
both kinds of connection share (h2 events, flow control, limits). h2stream.py: the two ends
of a proxied stream (``Half``) and the ``H2Exchange`` joining them. h2ends.py: the two kinds
of connection (``H2ServerConn``: a client's connection to us; ``H2ClientConn``: our pooled
connection to a peer proxy or the app) and ``H2Pool``. What to do with a stream (routing,
balancing, metrics) is h2proxy.py's.

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
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (ConnectionTerminated, DataReceived, PingReceived, RemoteSettingsChanged,
                       RequestReceived, ResponseReceived, StreamEnded, StreamReset,
                       TrailersReceived, WindowUpdated)
from h2.exceptions import ProtocolError, StreamClosedError

from .h2stream import Half, clean_headers

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


class _H2(H2Connection):
    MAX_CLOSED_STREAMS = 1024
    DEFAULT_MAX_HEADER_LIST_SIZE = MAX_HEADER_LIST


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
        if half.kept is not None:
            half.keep(("d", ev.data))
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
            half.keep(("e",))
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
            half.keep(("t", trailers))
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
