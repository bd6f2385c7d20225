"""The two halves of a proxied HTTP/2 stream (``Half``: one per connection) and the
``H2Exchange`` joining them. The theory of operation is in h2conn.py."""
from __future__ import annotations

import logging
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, ProtocolError, StreamClosedError

from . import clock

if TYPE_CHECKING:
    from .h2conn import H2Conn

log = logging.getLogger(__name__)

MAX_KEPT = 64 * 1024   # a request body kept for a retry (core.retry.MAX_BODY)

HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"upgrade", b"http2-settings", b"proxy-authorization",
                        b"proxy-authenticate"))


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
                 "resp_bytes", "method", "endpoint", "span", "route", "route_key", "admitted", "delay",
                 "policy", "retries", "res", "tried_at", "sent_headers", "try_timer")

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
        self.timer: Any = None        # the response deadline (grpc-timeout, a route's timeout)
        self.delay: Any = None        # outbound: a route's fault delay, or a retry's backoff
        self.policy: Any = None       # outbound: the route's core.retry.RetryPolicy, if any
        self.retries = 0
        self.res: Any = None          # outbound: the Resolution it is sent to (for retries)
        self.tried_at = 0.0           # outbound: when the attempt in flight began (perf_counter;
                                      # 0 between a failed attempt and the next)
        self.sent_headers: Any = None # outbound: the request headers sent upstream (for retries)
        self.try_timer: Any = None    # outbound, with a retry policy: the per-try timeout
        self.flag = ""
        self.router = router
        self.tap: Any = None          # a TapHub handle when someone taps this stream
        self.resp_bytes = 0           # response DATA bytes, counted only while tapped
        self.method = b""             # for tracing (set by the router when it traces)
        self.endpoint: Any = None     # outbound: the discovery.Endpoint picked
        self.span: Any = None         # a tracing.Span when this stream is traced
        self.route: Any = None        # outbound: the core.routing.Route it matched
        self.route_key = ""           # outbound: its row in `mesh routes` (resilience.ROUTES)
        self.admitted: Any = None     # outbound: the service's Admission holding a slot for it

    def pseudo(self, name: bytes) -> bytes:
        """A request pseudo-header's value (``:method``, ``:path``, ...), b"" when absent."""
        for n, v in self.headers:
            if n == name:
                return v
        return b""


class Half:
    """One side of a stream on one connection. ``peer`` is the other side."""

    __slots__ = ("conn", "sid", "peer", "x", "outq", "out_end", "out_trailers", "unacked",
                 "rx_done", "tx_done", "headers_sent", "early", "opened_at", "kept", "kept_len")

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
        # a request with a retry policy: what was forwarded upstream, to send again (a copy of
        # at most MAX_KEPT body bytes; None when not kept or over that)
        self.kept: list[Any] | None = None
        self.kept_len = 0

    def keep(self, item: tuple[Any, ...]) -> None:
        """Remember an item forwarded upstream (``early``'s format) for a retry."""
        kept = self.kept
        if kept is None or item[0] == "e" and kept and kept[-1][0] in "et":
            return   # (the end is already kept: h2 reports END_STREAM with the headers and alone)
        if item[0] == "d":
            self.kept_len += len(item[1])
            if self.kept_len > MAX_KEPT:
                self.kept = None   # too big to send again: this request is not retried
                return
        self.kept.append(item)

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
        self.conn.dirty = True   # (a timer's answer, e.g. a deadline, is flushed by its caller)
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
