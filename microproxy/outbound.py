"""The outbound router: an app's request -> its service's endpoints, over pooled mTLS.

app --plain--> 127.0.0.1:4140 --(resolve authority, pick endpoint, pooled mTLS)--> peer:4143
"""
from __future__ import annotations

import asyncio
import logging
import os
from time import monotonic
from typing import TYPE_CHECKING, Any

from . import resilience
from .core.breaker import Reject
from .discovery import Endpoint, Resolution
from .downstream import OK_CONNECT, ServerConn, TunnelPeer
from .http1 import Exchange, error_response
from .profiles import Profile
from .resilience import admit
from .routes import RouteRouter
from .tracing import CLIENT
from .upstream import Pipelining, Pool, UpstreamConn

if TYPE_CHECKING:
    from .proxy import Proxy

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
PIPELINED = "outbound_http_pipelined_total"   # requests sent behind another on a connection


def normalize_authority(host: bytes) -> str | None:
    """``Books.Default.`` -> ``books.default:80``; keeps an explicit port."""
    try:
        h = host.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return None
    if not h:
        return None
    if h.startswith("["):
        end = h.find("]")
        name, rest = h[: end + 1], h[end + 1:]
        port = rest[1:] if rest.startswith(":") else ("" if rest else "80")
    else:
        name, sep, port = h.partition(":")
        if not sep:
            port = "80"
    name = name.rstrip(".")
    if not port.isdigit() or not name or not 0 < int(port) < 65536:
        return None
    return f"{name}:{int(port)}"


def split_target(target: bytes) -> tuple[bytes | None, bytes]:
    """(authority or None, origin-form path) of a request target."""
    if target[:1] == b"/":
        return None, target
    low = target[:8].lower()
    if low.startswith(b"http://"):
        rest = target[7:]
    elif low.startswith(b"https://"):
        rest = target[8:]
    else:
        return None, b""
    cut = len(rest)
    for sep in (b"/", b"?", b"#"):
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    path = rest[cut:]
    if not path.startswith(b"/"):
        path = b"/" + path
    return rest[:cut], path


class Outbound:
    """Routes the app's requests to the service's endpoints over mTLS."""

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.pools: dict[tuple[tuple[str, int], str | None], Pool] = {}   # identity None: plaintext
        self.hosts: dict[bytes, str | None] = {}
        self.routing = RouteRouter(self)   # HTTPRoute decisions (routes.py)
        self.pipelining = Pipelining.from_env(os.environ)   # to peer proxies only

    def _authority(self, host: bytes) -> str | None:
        auth = self.hosts.get(host)
        if auth is None:
            auth = normalize_authority(host)
            if len(self.hosts) > 10000:
                self.hosts.clear()
            self.hosts[host] = auth
        return auth

    def dispatch(self, conn: ServerConn, ex: Exchange) -> None:
        host, path = split_target(ex.target)
        if host is None:
            if not path:
                conn.respond_error(ex, 400, "unsupported request target", "BR")
                return
            host = ex.host
        if not host:
            conn.respond_error(ex, 400, "no authority in request", "BR")
            return
        auth = self._authority(host)
        if auth is None:
            conn.respond_error(ex, 400, "invalid authority", "BR")
            return
        ex.authority = auth
        prof = self.proxy.profiles.get(auth)
        if prof.routed:   # HTTPRoutes attach to this service: select, split, mirror, time out
            self.routing.route(conn, ex, prof, host, path)
            return
        if prof.table is None:   # the routes of a new authority are not known yet
            self.proxy.spawn(self._wait_profile(conn, ex, prof, host, path))
            return
        if prof.default is not None:   # no HTTPRoute: the [default] route is only counted
            self.routing.count(ex, prof.default)
        tracer = self.proxy.tracer
        ex.wire_head = ex.head(path, host) if tracer is None else \
            ex.head(path, host, *tracer.begin(ex, CLIENT, path))
        self.resolve_and_send(conn, ex, auth)

    def resolve_and_send(self, conn: ServerConn, ex: Exchange, auth: str) -> None:
        """Send ``ex`` (head ready) to the service ``auth``, waiting for its endpoints if needed."""
        res = self.proxy.discovery.get(auth)
        if res.exists and res.endpoints:
            self.send(conn, ex, res)
        elif res.exists is False:
            conn.respond_error(ex, 503, f"unknown service {auth}", "NR")
        else:
            self.proxy.spawn(self._wait_then_send(conn, ex, res))

    async def _wait_profile(self, conn: ServerConn, ex: Exchange, prof: Profile, host: bytes,
                            path: bytes) -> None:
        try:
            await asyncio.wait_for(prof.ready.wait(), self.proxy.cfg.failfast_timeout)
        except asyncio.TimeoutError:
            log.info("routes not known in time; using the default route", extra={"authority": prof.authority})
        if ex.done:
            return
        if prof.routed:
            self.routing.route(conn, ex, prof, host, path)
            return
        self.routing.default(conn, ex, prof)
        tracer = self.proxy.tracer
        ex.wire_head = ex.head(path, host) if tracer is None else \
            ex.head(path, host, *tracer.begin(ex, CLIENT, path))
        self.resolve_and_send(conn, ex, ex.authority)

    async def _await_endpoints(self, res: Resolution) -> bool:
        deadline = asyncio.get_running_loop().time() + self.proxy.cfg.failfast_timeout
        while not (res.exists and res.endpoints):
            if res.exists is False:
                return False
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(res.changed.wait(), left)
            except asyncio.TimeoutError:
                return False
        return True

    async def _wait_then_send(self, conn: ServerConn, ex: Exchange, res: Resolution) -> None:
        ok = await self._await_endpoints(res)
        if ex.done:
            return
        if ok:
            self.send(conn, ex, res)
        elif res.exists is False:
            conn.respond_error(ex, 503, f"unknown service {res.authority}", "NR")
        else:
            conn.respond_error(ex, 504, f"no endpoints for {res.authority} (fail-fast)", "NR")

    def pool(self, ep: Endpoint) -> Pool:
        pool = ep.pool
        if pool is not None:
            return pool  # type: ignore[no-any-return]
        ep.pool = pool = self._pool(ep)
        return pool

    def _pool(self, ep: Endpoint) -> Pool:
        key = (ep.addr, ep.identity)
        pool = self.pools.get(key)
        if pool is None:
            proxy = self.proxy

            async def connect(p: Pool) -> UpstreamConn:
                if ep.identity is None:   # an unmeshed endpoint: plaintext HTTP/1.1, no TLS
                    _, up = await asyncio.wait_for(proxy.loop.create_connection(
                        lambda: UpstreamConn(p), ep.addr[0], ep.addr[1]), proxy.cfg.connect_timeout)
                    return up
                creds = proxy.creds
                assert creds is not None
                _, up = await asyncio.wait_for(proxy.loop.create_connection(
                    lambda: UpstreamConn(p), ep.addr[0], ep.addr[1], ssl=creds.client_ctx,
                    server_hostname=ep.identity, ssl_handshake_timeout=HANDSHAKE_TIMEOUT),
                    proxy.cfg.connect_timeout + HANDSHAKE_TIMEOUT)
                return up

            pool = self.pools[key] = Pool(proxy.loop, connect, self.retry, idle_timeout=60.0,
                                          pipelining=self.pipelining if ep.identity is not None else None)
        return pool

    def send(self, conn: ServerConn, ex: Exchange, res: Resolution) -> None:
        """Send ``ex`` (again, for a retry) to an endpoint of ``res`` picked by P2C peak-EWMA.

        The first call admits the request (per-service pending limit; 503 UO over it) and
        gives it a ``resilience.ReqState``; each call is one attempt."""
        st = ex.rs
        first = st is None
        if first:
            st = admit(self, conn, ex, res)
            if isinstance(st, Reject):
                conn.respond_error(ex, 503, st.reason, st.flag)
                return
            ex.rs = st
        ep = res.pick()
        if ep is None:   # every endpoint's breaker is open
            conn.respond_error(ex, 503, resilience.CIRCUIT_OPEN, "UO")
            return
        st.begin(ep.lb, monotonic())
        if st.policy is not None:
            st.arm(ex)   # the per-try timeout, when the route has one
        ex.endpoint = ep
        ex.metric_key = ep.metric_key
        proxy = self.proxy
        cells = ep.cells
        if cells is None:
            cells = ep.cells = self._cells(ep, ex.authority)
        if first:
            cells[0][0] += 1
        if proxy.tap.subs and ex.tap is None:
            ex.tap = proxy.tap_request(conn, ex.method, ex.authority, split_target(ex.target)[1] or ex.target, {
                "workload": ep.labels.get("workload"), "namespace": ep.labels.get("namespace"),
                "identity": ep.identity, "addr": f"{ep.addr[0]}:{ep.addr[1]}"}, True)
        pool = self.pool(ep)
        pipelinable = pool.depth > 1 and ex.pipelinable()
        if pipelinable:
            up = pool.pipeline_target()
            if up is not None:
                cells[1][0] += 1
                up.pipeline(ex, conn, ex.wire_head)
                return
        up = pool.take()
        if up is not None:
            up.attach(ex, conn, ex.wire_head, pipelinable)
        else:
            self.proxy.spawn(self._connect_then_attach(conn, ex, pool))

    def _cells(self, ep: Endpoint, authority: str) -> tuple[list[int], list[float]]:
        """An endpoint's first request: its counter cells, and its row in ``mesh stat``."""
        metrics = self.proxy.metrics
        key = ep.metric_key
        if key not in metrics.window.info:
            metrics.window.describe(
                key, direction="outbound", authority=authority, server_id=ep.identity,
                dst_workload=ep.labels.get("workload"), dst_namespace=ep.labels.get("namespace"),
                dst_pod=ep.labels.get("pod"), tls=ep.identity is not None)
        return metrics.request_cell(key), metrics.cell(PIPELINED, key)

    async def _connect_then_attach(self, conn: ServerConn, ex: Exchange, pool: Pool) -> None:
        st = ex.rs
        gen = st.gen if st is not None else 0
        adm = st.svc.admission if st is not None else None
        if adm is not None:
            verdict = adm.connect()
            if isinstance(verdict, resilience.breaker.Reject):
                conn.respond_error(ex, 503, verdict.reason, verdict.flag)
                return
        try:
            up = await pool.connect()
        except (OSError, asyncio.TimeoutError) as e:
            if adm is not None:
                adm.connection_done()
            reason = f"connect to {ex.endpoint.addr[0]}:{ex.endpoint.addr[1]} failed: {type(e).__name__}"
            if st is not None and st.gen != gen:
                return   # that attempt was cut by its per-try timeout and is being retried
            if st is not None:
                st.on_failure(ex, conn, 502, reason, "UF")
            else:
                conn.respond_error(ex, 502, reason, "UF")
            return
        if adm is not None:
            up.on_close = adm.connection_done
        if ex.done or st is not None and st.gen != gen:
            pool.release(up)
            return
        up.attach(ex, conn, ex.wire_head)

    def retry(self, conn: ServerConn, ex: Exchange) -> None:
        """A pooled connection was stale: the same endpoint, a new connection (not a retry)."""
        if ex.rs is not None:
            ex.rs.restart()
        self.proxy.spawn(self._connect_then_attach(conn, ex, self.pool(ex.endpoint)))

    def tunnel(self, conn: ServerConn, ex: Exchange, rest: bytes) -> None:
        auth = normalize_authority(ex.target)
        if auth is None:
            conn.write(error_response(400, "invalid CONNECT authority", close=True))
            conn.transport.close()
            return
        ex.authority = auth
        self.proxy.spawn(self._tunnel(conn, ex, auth, rest))

    async def open_tunnel(self, conn: ServerConn, ep: Endpoint, auth: str) -> tuple[Any, TunnelPeer, int]:
        """An mTLS connection to the peer proxy at ``ep`` and the status of its answer to our
        CONNECT for ``auth`` (0 when none came in time); its bytes go back to ``conn``.
        Raises OSError or asyncio.TimeoutError when the connection cannot be made."""
        proxy = self.proxy
        assert proxy.creds is not None
        transport, peer = await asyncio.wait_for(proxy.loop.create_connection(
            lambda: TunnelPeer(conn, handshake=True), ep.addr[0], ep.addr[1],
            ssl=proxy.creds.client_ctx, server_hostname=ep.identity,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT), proxy.cfg.connect_timeout + HANDSHAKE_TIMEOUT)
        transport.write(b"CONNECT %s HTTP/1.1\r\nhost: %s\r\n\r\n" % (auth.encode(), auth.encode()))
        assert peer.handshake is not None
        try:
            code = await asyncio.wait_for(peer.handshake, HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            code = 0
        return transport, peer, code

    async def _tunnel(self, conn: ServerConn, ex: Exchange, auth: str, rest: bytes) -> None:
        proxy = self.proxy
        res = proxy.discovery.get(auth)

        def fail(status: int, reason: str) -> None:
            log.warning("proxy error", extra={"status": status, "reason": reason, "authority": auth})
            if not conn.transport.is_closing():  # a refusing peer's EOF may have closed it already
                conn.write(error_response(status, reason, close=True))
            conn.transport.close()

        if not await self._await_endpoints(res):
            fail(503 if res.exists is False else 504, f"no endpoints for {auth}")
            return
        ep = res.pick()
        if ep is None:
            fail(503, resilience.CIRCUIT_OPEN)
            return
        try:
            transport, peer, code = await self.open_tunnel(conn, ep, auth)
        except (OSError, asyncio.TimeoutError) as e:
            fail(502, f"connect failed: {type(e).__name__}")
            return
        if code != 200 or conn.transport.is_closing():
            transport.close()
            fail(502, f"peer refused the tunnel ({code})")
            return
        conn.write(OK_CONNECT)
        peer.splice()
        conn.start_splice(transport, rest)
