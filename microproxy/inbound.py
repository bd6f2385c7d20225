"""The inbound router: a peer's (or a plaintext client's) request -> the local app.

peer --mTLS or plaintext (detected on the first byte)--> :4143 --plain--> 127.0.0.1:app_port
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from .downstream import OK_CONNECT, ServerConn, TunnelPeer
from .http1 import Exchange, error_response
from .metrics import labels
from .tracing import SERVER
from .upstream import Pool, UpstreamConn

if TYPE_CHECKING:
    from .proxy import Proxy

DROP_CLIENT_ID = frozenset((b"x-mesh-client-id",))


class Inbound:
    """Forwards requests from peers (and plaintext clients) to the local app."""

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        port = proxy.cfg.app_port
        self.app_pool: Pool | None = None
        if port is not None:
            async def connect(p: Pool) -> UpstreamConn:
                _, up = await asyncio.wait_for(proxy.loop.create_connection(
                    lambda: UpstreamConn(p), "127.0.0.1", port), proxy.cfg.connect_timeout)
                return up
            self.app_pool = Pool(proxy.loop, connect, self.retry, idle_timeout=4.0)

    def per_host(self, conn: Any, host: bytes | None) -> tuple[str, str, list[tuple[bytes, bytes]], list[int]]:
        """(metric key, authority, extra request headers, request_total cell) for requests
        to ``host`` on ``conn``: computed once per connection and host."""
        auth = (host or b"").decode("latin-1")
        if conn.tls:
            key = labels(direction="inbound", authority=auth, tls="true", client_id=conn.peer_id or "")
        else:
            key = labels(direction="inbound", authority=auth, tls="no_identity",
                         no_tls_reason="no_tls_from_remote")
        self.proxy.metrics.window.describe(key, direction="inbound", authority=auth,
                                           client_id=conn.peer_id, tls=conn.tls)
        extra = [(b"x-mesh-client-id", conn.peer_id.encode())] if conn.peer_id else []
        entry = conn.cache[host] = (key, auth, extra, self.proxy.metrics.request_cell(key))
        return entry

    def metric_key(self, conn: Any, host: bytes | None) -> str:
        """The inbound metric label string for ``host`` on ``conn`` (an HTTP/1 or h2 connection)."""
        return (conn.cache.get(host) or self.per_host(conn, host))[0]

    def dispatch(self, conn: ServerConn, ex: Exchange) -> None:
        key, ex.authority, extra, requests = conn.cache.get(ex.host) or self.per_host(conn, ex.host)
        ex.metric_key = key
        requests[0] += 1
        proxy = self.proxy
        if proxy.tap.subs:
            cfg = proxy.cfg
            ex.tap = proxy.tap_request(conn, ex.method, ex.authority, ex.target, {
                "workload": cfg.workload, "namespace": cfg.namespace, "identity": cfg.identity,
                "addr": f"127.0.0.1:{cfg.app_port}"}, conn.tls)
        pool = self.app_pool
        if pool is None:
            conn.respond_error(ex, 503, "this workload serves no port", "NR")
            return
        if not proxy.authz.allow_http(conn, ex):
            return  # denied and answered (403, or gRPC PERMISSION_DENIED)
        tracer = self.proxy.tracer
        ex.wire_head = ex.head(ex.target, ex.host, extra, DROP_CLIENT_ID) if tracer is None else \
            ex.head(ex.target, ex.host, *tracer.begin(ex, SERVER, ex.target, extra, DROP_CLIENT_ID))
        up = pool.take()
        if up is not None:
            up.attach(ex, conn, ex.wire_head)
        else:
            self.proxy.spawn(self._connect_then_attach(conn, ex, pool))

    async def _connect_then_attach(self, conn: ServerConn, ex: Exchange, pool: Pool) -> None:
        try:
            up = await pool.connect()
        except (OSError, asyncio.TimeoutError) as e:
            conn.respond_error(ex, 502, f"connect to app port failed: {type(e).__name__}", "UF")
            return
        if ex.done:
            pool.release(up)
            return
        up.attach(ex, conn, ex.wire_head)

    def retry(self, conn: ServerConn, ex: Exchange) -> None:
        assert self.app_pool is not None
        self.proxy.spawn(self._connect_then_attach(conn, ex, self.app_pool))

    def tunnel(self, conn: ServerConn, ex: Exchange, rest: bytes) -> None:
        if not self.proxy.authz.allow_tunnel(conn, ex):
            return  # denied: answered 403 and closed; nothing reached the app
        self.proxy.spawn(self._tunnel(conn, rest))

    async def _tunnel(self, conn: ServerConn, rest: bytes) -> None:
        port = self.proxy.cfg.app_port
        if port is None:
            conn.write(error_response(503, "this workload serves no port", close=True))
            conn.transport.close()
            return
        try:
            transport, peer = await asyncio.wait_for(self.proxy.loop.create_connection(
                lambda: TunnelPeer(conn), "127.0.0.1", port), self.proxy.cfg.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            conn.write(error_response(502, f"connect to app port failed: {type(e).__name__}", close=True))
            conn.transport.close()
            return
        conn.write(OK_CONNECT)
        peer.splice()
        conn.start_splice(transport, rest)
