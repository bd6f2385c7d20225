"""HTTP/2 (and so gRPC) proxying on the ``h2`` library: per-request balancing over pooled,
multiplexed proxy-to-proxy connections, streaming both ways with real flow control.

Theory of operation
-------------------
Detection. ``ServerConn`` (downstream.py) calls ``take_over`` with the first bytes of every
connection that starts with ``PRI``; if they are the HTTP/2 client preface, an
``H2ServerConn`` replaces it on the same transport (``transport.set_protocol``). That covers
prior-knowledge h2c on the outbound listener, plaintext h2c on the inbound listener, and
mTLS with ALPN ``h2`` on the inbound listener (an ALPN-h2 client starts with the preface).
``h2`` is imported only when HTTP/2 shows up (it costs memory: PERF-LAB.md).

Streams. Each request stream is a pair of ``Half`` s: the downstream half (on the client's
connection) and the upstream half (on a pooled ``H2ClientConn``), joined by an ``H2Exchange``
that carries what metrics need. Outbound, every stream's ``:authority`` is resolved and an
endpoint picked (P2C, as HTTP/1), so consecutive requests on one client connection spread
over endpoints; each endpoint has one multiplexed mTLS connection (ALPN h2), more only when
the peer's MAX_CONCURRENT_STREAMS is reached. Inbound, streams go to the app over h2c.

Flow control, limits and the connection protocols: h2conn.py, h2stream.py, h2ends.py.

Tap and tracing: each stream is offered to ``mesh tap`` subscribers and, with tracing on,
gets a span, like an HTTP/1 request (outbound once an endpoint is picked, inbound once
authorized); the tap end event and the span carry the gRPC status.

Outbound streams follow the service's HTTPRoutes (match, split, header modifiers, timeouts,
faults) and its retry policy, within its admission limit: h2outbound.py.

Not here (yet): mirrors for HTTP/2 streams; HTTP/2 to an HTTP/1-only app (no downgrade);
CONNECT over HTTP/2.
"""
from __future__ import annotations

import asyncio
import logging
from time import perf_counter
from typing import Any

from h2.errors import ErrorCodes

from . import clock, grpc, tls
from .authz import HTTP_ALLOW, HTTP_DENY
from .h2ends import H2ClientConn, H2Pool, H2ServerConn
from .h2stream import H2Exchange, Half, clean_headers
from .observe import TapHub
from .resilience import ROUTES
from .tracing import SERVER

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HANDSHAKE_TIMEOUT = 10.0
CLIENT_ID = b"x-mesh-client-id"
CLIENT_GONE = frozenset(("client disconnected", "client reset", "client went away"))


def is_preface(data: bytes) -> bool:
    n = min(len(data), len(PREFACE))
    return n >= 3 and data[:n] == PREFACE[:n]


def take_over(conn: Any, data: bytes) -> bool:
    """Called by ``ServerConn`` on its first bytes when they start with ``PRI``: serve the
    connection as HTTP/2 if they are the preface. False: not HTTP/2, carry on as HTTP/1."""
    if not is_preface(data):
        return False
    router = conn.router
    h2r = router.__dict__.get("h2_router")
    if h2r is None:
        if conn.direction == "outbound":
            from .h2outbound import Outbound2
            h2r = router.h2_router = Outbound2(router.proxy)
        else:
            h2r = router.h2_router = Inbound2(router.proxy)
    srv = H2ServerConn(h2r, conn)
    conn.registry.discard(conn)
    conn.closing = True
    conn.transport.set_protocol(srv)
    srv.adopt(conn.transport)
    srv.data_received(data)
    return True


_client_ctx: tuple[Any, Any] = (None, None)


def h2_client_context(creds: Any) -> Any:
    """A client SSLContext offering ALPN ``h2`` only, for the HTTP/2 pools (HTTP/1 pools keep
    ``creds.client_ctx``, which offers no ALPN). Rebuilt when the certificate changes."""
    global _client_ctx
    if _client_ctx[0] is not creds:
        _client_ctx = (creds, tls.client_context(creds.trust_pem, creds.chain_pem, creds.key_pem,
                                                 alpn=["h2"]))
    return _client_ctx[1]


# --- routers


class Router2:
    """Common to outbound and inbound: answer, finish and count an H2Exchange."""

    direction = ""

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.loop = proxy.loop

    def open_upstream(self, x: H2Exchange, conn: H2ClientConn, headers: list[tuple[bytes, bytes]]) -> None:
        down = x.down
        if x.done or down.tx_done or down.sid not in down.conn.streams:
            return
        early = down.early or []
        end = bool(early) and early == [("e",)]
        up = conn.open(down, headers, end)
        if up.sid not in conn.streams:   # h2 refused to open it (e.g. over the peer's limit)
            self.fail(x, 503, "upstream refused the stream")
            return
        x.up = up
        if end:
            down.keep(("e",))
            early = []
        down.early = None
        up.peer, down.peer = down, up
        for item in early:
            down.keep(item)   # (a request that may be retried: kept to send again)
            if item[0] == "d":
                up.send_data(item[1])
            elif item[0] == "t":
                up.send_trailers(item[1])
            else:
                up.send_end()
        up.release()
        conn.flush()
        if down.conn.dirty:
            down.conn.flush()

    def fail(self, x: H2Exchange, status: int, reason: str, grpc_status: int | None = None) -> None:
        """A proxy-made error: trailers-only gRPC error or an HTTP error; the upstream stream,
        if any, is cancelled."""
        if x.done:
            return
        x.flag = reason
        down = x.down
        log.warning("proxy error", extra={"status": status, "reason": reason, "authority": x.authority,
                                          "direction": self.direction, "protocol": "HTTP/2"})
        up = x.up
        if up is not None:
            up.peer = None
            up.reset(ErrorCodes.CANCEL)
            if up.conn.dirty:
                up.conn.flush()
        down.peer = None
        down.early = None
        if down.headers_sent or down.tx_done:
            down.reset(ErrorCodes.INTERNAL_ERROR)
        elif x.grpc:
            code = grpc.status_for_http(status) if grpc_status is None else grpc_status
            x.status, x.grpc_status = 200, code
            down.send_headers(grpc.trailers_only(code, reason), end=True)
        else:
            body = f"{reason}\n".encode()
            x.status = status
            down.send_headers([(b":status", b"%d" % status), (b"content-type", b"text/plain"),
                               (b"content-length", b"%d" % len(body)),
                               (grpc.ERROR_HEADER, grpc.encode_message(reason))])
            down.send_data(body)
            down.send_end()
        if not down.rx_done and down.tx_done:
            down.reset(ErrorCodes.NO_ERROR)   # we answered: the client need not send the rest
        self.finish(x, reason)
        if down.conn.dirty:
            down.conn.flush()

    def tap(self, x: H2Exchange, dst: dict[str, Any]) -> None:
        """Offer the stream to tap subscribers (``mesh tap``), as HTTP/1 requests are."""
        conn = x.down.conn
        x.tap = self.proxy.tap_request(conn, x.pseudo(b":method"), x.authority, x.pseudo(b":path"),
                                       dst, conn.tls or conn.direction == "outbound")

    def trace(self, x: H2Exchange, kind: int, extra: list[tuple[bytes, bytes]],
              drop: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
        """The headers to send on: ``x``'s, cleaned, with ``extra``; with tracing on, the
        stream gets a span and the trace context headers are rewritten (tracing.py)."""
        tracer = self.proxy.tracer
        if tracer is not None:
            x.method = x.pseudo(b":method")
            extra, drop = tracer.begin(x, kind, x.pseudo(b":path"), extra, drop)
        return clean_headers(x.headers, drop) + list(extra)

    def finish(self, x: H2Exchange, error: str | None) -> None:
        if x.done:
            return
        x.done = True
        if x.span is not None:
            x.span.finish(x, x.down.conn)
        if x.timer is not None:
            x.timer.cancel()
        if x.delay is not None:
            x.delay.cancel()
        if x.try_timer is not None:
            x.try_timer.cancel()
        t = x.resp_at or perf_counter()
        latency = (t - x.start) * 1000.0
        if x.tap is not None:
            TapHub.finish(x.tap, x.status, int(latency * 1000), int((perf_counter() - x.start) * 1e6),
                          x.resp_bytes, error, x.grpc_status if x.grpc else None)
        failure = grpc.failed(x.status, x.grpc_status, x.grpc) or (x.status == 0)
        tried = x.tried_at or x.start   # the attempt's start (outbound), else the stream's
        if x.lb is not None:   # the balancer's view: latency, and failures for the breaker
            if error in CLIENT_GONE:
                x.lb.cancel()      # the caller left: says nothing about the endpoint
            else:
                x.lb.end(clock.monotonic(), (t - tried) if x.resp_at else None,
                         x.status >= 500 or (x.grpc and x.grpc_status in grpc.BREAKER_CODES))
        if x.admitted is not None:
            x.admitted.request_done()
            x.admitted = None
        if x.route is not None:   # outbound: route_response_total and `mesh routes`
            self.proxy.outbound.routing.count_response(x.route, failure)
        if x.route_key:   # `mesh routes`: effective (the call) and actual (each attempt)
            if x.retries:
                ROUTES.effective.add(x.route_key, failure, latency, t)
                if x.tried_at:   # an attempt ran since the last failed one
                    ROUTES.actual.add(x.route_key, failure, (t - x.tried_at) * 1000.0, t)
            else:
                ROUTES.both.add(x.route_key, failure, latency, t)
        if x.metric_key:
            self.proxy.metrics.record(x.metric_key, x.status, failure, latency, t,
                                      x.grpc_status if x.grpc else False)
        if x.flag or log.isEnabledFor(logging.DEBUG):
            log.info("access", extra={"direction": self.direction, "authority": x.authority,
                                      "status": x.status, "grpc_status": x.grpc_status,
                                      "error": error, "protocol": "HTTP/2"})

    def arm_deadline(self, x: H2Exchange, limit: float = 0.0, reason: str = "") -> None:
        """Bound the response: without ``limit``, by a gRPC call's ``grpc-timeout`` (armed when
        the call arrives); with it, by a route's timeout of ``limit`` seconds, unless the
        deadline already armed comes first. Past it: 504 (gRPC: DEADLINE_EXCEEDED), or both
        streams reset when the response had begun (as HTTP/1 aborts)."""
        if limit:
            at = self.loop.time() + limit
            if x.timer is not None:
                if x.timer.when() <= at:
                    return
                x.timer.cancel()
            x.timer = self.loop.call_at(at, self._deadline, x, reason)
            return
        if not x.grpc:
            return
        for name, value in x.headers:
            if name == b"grpc-timeout":
                secs = grpc.parse_timeout(value)
                if secs is not None:
                    x.timer = self.loop.call_later(secs, self._deadline, x, "deadline exceeded")
                return

    def _deadline(self, x: H2Exchange, reason: str) -> None:
        x.timer = None
        if x.done:
            return
        if x.lb is not None:   # the caller's time ran out: that says nothing about the endpoint
            x.lb.cancel()
            x.lb = None
        self.fail(x, 504, reason, grpc.DEADLINE_EXCEEDED)


class Inbound2(Router2):
    """HTTP/2 streams from peers (mTLS, ALPN h2) or plaintext h2c clients: authorize, count,
    forward to the app over h2c (prior knowledge) on a multiplexed connection."""

    direction = "inbound"

    def __init__(self, proxy: Any) -> None:
        super().__init__(proxy)
        port = proxy.cfg.app_port
        self.app_pool: H2Pool | None = None
        if port is not None:
            async def connect(p: H2Pool) -> H2ClientConn:
                _, c = await asyncio.wait_for(proxy.loop.create_connection(
                    lambda: H2ClientConn(proxy.loop, p), "127.0.0.1", port), proxy.cfg.connect_timeout)
                return c  # type: ignore[no-any-return]
            self.app_pool = H2Pool(connect, idle_timeout=4.0)   # as the HTTP/1 app pool

    def sweep(self, now: float) -> None:
        if self.app_pool is not None:
            self.app_pool.sweep(now)

    def dispatch(self, conn: H2ServerConn, x: H2Exchange) -> None:
        proxy = self.proxy
        host = b""
        method = b""
        path = b""
        for name, value in x.headers:
            if name == b":authority":
                host = value
            elif name == b":method":
                method = value
            elif name == b":path":
                path = value
        x.authority = host.decode("latin-1")
        x.metric_key = proxy.inbound.metric_key(conn, host)
        proxy.metrics.request(x.metric_key)
        if self.app_pool is None:
            self.fail(x, 503, "this workload serves no port")
            return
        authz = proxy.authz
        d = authz.decide(conn, method, path)
        if d.audit is not None:
            authz._audit(d, conn, f"{method.decode('latin-1')} {path.decode('latin-1')}", x.authority)
        if not d.allowed:
            proxy.metrics.inc(HTTP_DENY, d.metric_key)
            self.fail(x, 403, d.reason)
            return
        proxy.metrics.inc(HTTP_ALLOW, d.metric_key)
        if proxy.tap.subs:
            cfg = proxy.cfg
            self.tap(x, {"workload": cfg.workload, "namespace": cfg.namespace, "identity": cfg.identity,
                         "addr": f"127.0.0.1:{cfg.app_port}"})
        self.arm_deadline(x)
        headers = self.trace(x, SERVER, [(CLIENT_ID, conn.peer_id.encode())] if conn.peer_id else [],
                             frozenset((CLIENT_ID,)))
        c = self.app_pool.take()
        if c is not None:
            self.open_upstream(x, c, headers)
        else:
            proxy.spawn(self._connect_then_open(x, headers))

    async def _connect_then_open(self, x: H2Exchange, headers: Any) -> None:
        assert self.app_pool is not None
        try:
            c = await self.app_pool.get()
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            self.fail(x, 502, f"connect to app port failed: {type(e).__name__}")
            return
        self.open_upstream(x, c, headers)


__all__ = ["take_over", "is_preface", "clean_headers", "H2ServerConn", "H2ClientConn", "H2Pool",
           "Half", "Inbound2"]
