"""The proxy: outbound and inbound routers, listeners, admin, lifecycle.

outbound: app --plain--> 127.0.0.1:4140 --(resolve authority, pick endpoint, pooled mTLS)--> peer:4143
inbound:  peer --mTLS or plaintext (detected on the first byte)--> :4143 --plain--> 127.0.0.1:app_port
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from . import clock, ctlhttp, resilience
from .authz import Authorizer
from .config import Config
from .discovery import Discovery, Endpoint, Resolution
from .downstream import OK_CONNECT, ServerConn, TunnelPeer
from .http1 import Exchange, error_response
from .identity_client import Credentials, IdentityClient, describe_creds, refresh_in
from .metrics import CONTENT_TYPE, Metrics, labels
from .mirror import Mirrors
from .profiles import Profile, Profiles
from .routes import RouteRouter
from .observe import Subscriber, TapHub
from .tracing import CLIENT, SERVER, build_tracer
from .upstream import Pipelining, Pool, UpstreamConn

log = logging.getLogger(__name__)

DETECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
SWEEP_INTERVAL = 5.0
IDLE_TIMEOUT = 90.0          # downstream keep-alive connections with nothing in flight
HEADER_TIMEOUT = 10.0        # a request head must arrive this fast (slowloris)
DROP_CLIENT_ID = frozenset((b"x-mesh-client-id",))
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


def parse_window(text: str) -> int | None:
    if not text.isdigit():
        return None
    n = int(text)
    return n if 1 <= n <= 600 else None


def identity_parts(identity: str | None) -> tuple[str | None, str | None]:
    """``sa.ns.serviceaccount.identity.td`` -> (sa, ns)."""
    if not identity or ".serviceaccount.identity." not in identity:
        return None, None
    head = identity.split(".serviceaccount.identity.", 1)[0]
    sa, _, ns = head.partition(".")
    return sa or None, ns or None


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
            st = resilience.admit(self, conn, ex, res)
            if isinstance(st, resilience.breaker.Reject):
                conn.respond_error(ex, 503, st.reason, st.flag)
                return
            ex.rs = st
        ep = res.pick()
        if ep is None:   # every endpoint's breaker is open
            conn.respond_error(ex, 503, resilience.CIRCUIT_OPEN, "UO")
            return
        st.begin(ep.lb, resilience.monotonic())
        if st.policy is not None:
            st.arm(ex)   # the per-try timeout, when the route has one
        ex.endpoint = ep
        ex.metric_key = ep.metric_key
        proxy = self.proxy
        if first:
            proxy.metrics.request(ep.metric_key)
        if ep.metric_key not in proxy.metrics.window.info:
            proxy.metrics.window.describe(
                ep.metric_key, direction="outbound", authority=ex.authority, server_id=ep.identity,
                dst_workload=ep.labels.get("workload"), dst_namespace=ep.labels.get("namespace"),
                dst_pod=ep.labels.get("pod"), tls=ep.identity is not None)
        if proxy.tap.subs and ex.tap is None:
            ex.tap = proxy.tap_request(conn, ex.method, ex.authority, split_target(ex.target)[1] or ex.target, {
                "workload": ep.labels.get("workload"), "namespace": ep.labels.get("namespace"),
                "identity": ep.identity, "addr": f"{ep.addr[0]}:{ep.addr[1]}"}, True)
        pool = self.pool(ep)
        pipelinable = pool.depth > 1 and ex.pipelinable()
        if pipelinable:
            up = pool.pipeline_target()
            if up is not None:
                proxy.metrics.inc(PIPELINED, ep.metric_key)
                up.pipeline(ex, conn, ex.wire_head)
                return
        up = pool.take()
        if up is not None:
            up.attach(ex, conn, ex.wire_head, pipelinable)
        else:
            self.proxy.spawn(self._connect_then_attach(conn, ex, pool))

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

    def per_host(self, conn: Any, host: bytes | None) -> tuple[str, str, list[tuple[bytes, bytes]]]:
        """(metric key, authority, extra request headers) for requests to ``host`` on
        ``conn``: computed once per connection and host."""
        auth = (host or b"").decode("latin-1")
        if conn.tls:
            key = labels(direction="inbound", authority=auth, tls="true", client_id=conn.peer_id or "")
        else:
            key = labels(direction="inbound", authority=auth, tls="no_identity",
                         no_tls_reason="no_tls_from_remote")
        self.proxy.metrics.window.describe(key, direction="inbound", authority=auth,
                                           client_id=conn.peer_id, tls=conn.tls)
        extra = [(b"x-mesh-client-id", conn.peer_id.encode())] if conn.peer_id else []
        entry = conn.cache[host] = (key, auth, extra)
        return entry

    def metric_key(self, conn: Any, host: bytes | None) -> str:
        """The inbound metric label string for ``host`` on ``conn`` (an HTTP/1 or h2 connection)."""
        return (conn.cache.get(host) or self.per_host(conn, host))[0]

    def dispatch(self, conn: ServerConn, ex: Exchange) -> None:
        key, ex.authority, extra = conn.cache.get(ex.host) or self.per_host(conn, ex.host)
        ex.metric_key = key
        proxy = self.proxy
        proxy.metrics.request(key)
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


class Proxy:
    def __init__(self, cfg: Config, loop: asyncio.AbstractEventLoop) -> None:
        self.cfg = cfg
        self.loop = loop
        self.metrics = Metrics(base=labels(namespace=cfg.namespace, workload=cfg.workload))
        self.tracer = build_tracer(cfg, self.metrics)   # None: tracing off
        self.creds: Credentials | None = None
        self.conns: set[ServerConn] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.discovery = Discovery(cfg, self._destination_client, loop)
        self.authz = Authorizer(cfg, self._destination_client, self.metrics)
        self.profiles = Profiles(cfg, self._destination_client, loop)   # HTTPRoutes per authority
        self.mirrors = Mirrors(self)                                     # RequestMirror copies
        self.outbound = Outbound(self)
        self.inbound = Inbound(self)
        self.identity = IdentityClient(cfg, clock.now)
        self.ports: dict[str, int] = {}
        self.servers: list[Any] = []
        self.stopping = asyncio.Event()
        self.tap = TapHub(cfg.instance)
        self.started = clock.monotonic()
        self._inbound_sock: socket.socket | None = None
        self.admin_server: Any = None

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        t = self.loop.create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    def _destination_client(self) -> ctlhttp.Client:
        assert self.creds is not None
        host, port = self.cfg.destination_addr
        return ctlhttp.Client(host, port, ssl=self.creds.client_ctx,
                              server_hostname=self.cfg.destination_name, timeout=5.0)

    def set_creds(self, creds: Credentials) -> None:
        creds.server_ctx.set_alpn_protocols(["h2", "http/1.1"])   # inbound: ALPN h2 -> h2proxy
        self.creds = creds
        self.metrics.set_gauge("identity_cert_expiration_timestamp_seconds", "", creds.valid_until)
        self.metrics.inc("identity_cert_refresh_total")
        self.discovery.reset_client()

    # --- observability
    def tap_request(self, conn: Any, method: bytes, authority: str, path: bytes,
                    dst: dict[str, Any], tls: bool) -> Any:
        """Offer a request to the tap subscribers (``conn``: an HTTP/1 or HTTP/2 connection
        with ``direction``, ``peer_id`` and ``transport``); a handle when someone taps it."""
        cfg = self.cfg
        peer = conn.transport.get_extra_info("peername")
        peer_addr = f"{peer[0]}:{peer[1]}" if peer else None
        if conn.direction == "outbound":
            src = {"workload": cfg.workload, "namespace": cfg.namespace, "identity": cfg.identity,
                   "addr": peer_addr}
        else:
            sa, ns = identity_parts(conn.peer_id)
            src = {"workload": sa, "namespace": ns, "identity": conn.peer_id, "addr": peer_addr}
        now = clock.monotonic()
        return self.tap.request(method, path, authority, now, {
            "direction": conn.direction, "ts": clock.now(), "src": src, "dst": dst, "tls": tls,
            "method": method.decode("latin-1"), "authority": authority,
            "path": path.decode("latin-1")})

    def tcp_totals(self) -> tuple[int, int, int, int]:
        """Cumulative (inbound read, inbound write, outbound read, outbound write) bytes."""
        t = [0, 0, 0, 0]
        m = self.metrics
        for key, n in m.tcp_read.items():
            t[0 if 'direction="inbound"' in key else 2] += n
        for key, n in m.tcp_write.items():
            t[1 if 'direction="inbound"' in key else 3] += n
        for c in self.conns:
            i = 0 if c.direction == "inbound" else 2
            t[i] += c.read_bytes
            t[i + 1] += c.written
        return t[0], t[1], t[2], t[3]

    def stats(self, window: int) -> dict[str, Any]:
        cfg = self.cfg
        now = clock.monotonic()
        w = self.metrics.window
        rows = w.summary(window, now)
        tb = w.tcp_bytes(window, now, self.tcp_totals())
        open_in = sum(1 for c in self.conns if c.direction == "inbound")
        from . import __version__
        from .metrics import BUCKETS
        return {
            "workload": cfg.workload, "namespace": cfg.namespace, "pod": cfg.instance,
            "identity": cfg.identity, "version": __version__, "window": window,
            # the last `window` whole seconds (or since start, for a young proxy)
            "elapsed": max(0.0, min(float(window), int(now) - self.started)), "buckets_ms": list(BUCKETS),
            "inbound": rows.get("inbound", []), "outbound": rows.get("outbound", []),
            "tcp": {"inbound": {"open": open_in, "read_bytes": tb[0], "write_bytes": tb[1]},
                    "outbound": {"open": len(self.conns) - open_in, "read_bytes": tb[2],
                                 "write_bytes": tb[3]}},
        }

    # --- readiness
    def ready(self) -> tuple[bool, str]:
        if self.creds is None:
            return False, "no certificate yet"
        if not self.discovery.reachable:
            return False, "destination not reached yet"
        if self.cfg.app_port is not None and not self.authz.known:
            return False, "authorization policy not known yet"
        if self.cfg.register and self.cfg.app_port and not self.discovery.registered:
            return False, "workload not registered yet (is the app listening?)"
        return True, "ready"

    # --- listeners
    async def start(self) -> None:
        cfg = self.cfg
        # Admin first, so /live answers and /ready says why it is not ready; no TLS
        # listener exists before the first certificate.
        admin = await ctlhttp.serve(self.admin, cfg.admin_addr[0], cfg.admin_addr[1])
        self.admin_server = admin
        self.ports["admin"] = admin.sockets[0].getsockname()[1]
        self.set_creds(await self.identity.certify_with_retry())
        if cfg.transparent:   # iptables-redirected TCP: HTTP by Host, the rest opaque (transparent.py)
            from .transparent import TransparentOutbound
            out = TransparentOutbound(self).listen(cfg.outbound_addr)
        else:
            out = await self.loop.create_server(
                lambda: ServerConn(self.outbound, self.metrics, self.conns, self.loop, "outbound"),
                cfg.outbound_addr[0], cfg.outbound_addr[1], backlog=1024, reuse_address=True)
        self.servers.append(out)
        self.ports["outbound"] = out.sockets[0].getsockname()[1]
        self._inbound_sock = self._listen(cfg.inbound_addr)
        self.ports["inbound"] = self._inbound_sock.getsockname()[1]
        self.spawn(self._accept_inbound(self._inbound_sock))
        self.servers.append(admin)
        if cfg.ports_file:
            tmp = cfg.ports_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"pid": os.getpid(), **self.ports}, f)
            os.replace(tmp, cfg.ports_file)
        if cfg.app_port is not None:  # a served port: know its policy before registering it
            self.spawn(self.authz.run())
            self.spawn(self.authz.after_first_policy(lambda: self.discovery.run_lease(self.ports["inbound"])))
        else:
            self.spawn(self.discovery.run_lease(self.ports["inbound"]))
        self.spawn(self._renew())
        self.spawn(self._sweep())
        self.spawn(self._tick())
        if self.tracer is not None:
            self.spawn(self.tracer.run())
        log.info("proxy started", extra=self.ports)

    def _listen(self, addr: tuple[str, int]) -> socket.socket:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(1024)
        s.setblocking(False)
        return s

    async def _accept_inbound(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = await self.loop.sock_accept(lsock)
            except OSError as e:
                log.warning("accept failed", extra={"error": repr(e)})
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.spawn(self._detect(sock))

    async def _detect(self, sock: socket.socket) -> None:
        """Peek at the first byte: 0x16 is a TLS handshake record, anything else plaintext."""
        fut: asyncio.Future[None] = self.loop.create_future()
        fd = sock.fileno()
        self.loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
        try:
            await asyncio.wait_for(fut, DETECT_TIMEOUT)
            first = sock.recv(1, socket.MSG_PEEK)
        except (asyncio.TimeoutError, OSError):
            first = b""
        finally:
            self.loop.remove_reader(fd)
        if not first or self.stopping.is_set():
            sock.close()
            return
        is_tls = first[0] == 0x16
        try:
            if is_tls:
                assert self.creds is not None
                await self.loop.connect_accepted_socket(
                    lambda: ServerConn(self.inbound, self.metrics, self.conns, self.loop, "inbound", tls=True),
                    sock, ssl=self.creds.server_ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            else:
                await self.loop.connect_accepted_socket(
                    lambda: ServerConn(self.inbound, self.metrics, self.conns, self.loop, "inbound"), sock)
        except (OSError, asyncio.TimeoutError) as e:
            # failed handshakes (unknown CA, TLS 1.2, no shared cipher ...) end here
            log.info("inbound connection failed", extra={"tls": is_tls, "error": repr(e)})
            self.metrics.inc("inbound_tls_handshake_errors_total")
            sock.close()

    # --- background loops
    async def _renew(self) -> None:
        while True:
            creds = self.creds
            assert creds is not None
            if await self.identity.wait_refresh(refresh_in(creds.issued_at, creds.valid_until, clock.now())):
                continue  # renewed on request (admin POST /renew): reschedule from the new certificate
            try:
                self.set_creds(await self.identity.certify_with_retry(stop_at=creds.valid_until))
            except TimeoutError:
                log.error("certificate expired before it could be renewed")

    async def _tick(self) -> None:
        while True:
            self.metrics.window.tick_tcp(clock.monotonic(), self.tcp_totals())
            await asyncio.sleep(1.0)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = self.loop.time()
            for conn in list(self.conns):
                if conn.tunnel_peer is not None or conn.active is not None:
                    continue
                idle = now - conn.last_active
                if idle > IDLE_TIMEOUT or (conn._in_head and idle > HEADER_TIMEOUT):
                    conn.transport.close()
            for pool in list(self.outbound.pools.values()):
                pool.sweep(now)
            if self.inbound.app_pool is not None:
                self.inbound.app_pool.sweep(now)
            self.discovery.evict()
            self.profiles.evict()

    # --- admin
    async def admin(self, req: ctlhttp.Request) -> ctlhttp.Response | ctlhttp.Stream:
        path = req.path
        if path == "/metrics":
            resilience.refresh_gauges(self.metrics, self.discovery.resolutions)
            return ctlhttp.Stream(self._metrics_chunks(), headers=[("content-type", CONTENT_TYPE)])
        if path == "/live":
            return ctlhttp.Response(200, b"live\n")
        if path == "/ready":
            ok, why = self.ready()
            return ctlhttp.Response(200 if ok else 503, (why + "\n").encode())
        if path == "/config":
            return ctlhttp.Response.json(self.describe())
        if path == "/renew":  # certify now (certificate rotation; loopback callers only)
            return await self.identity.admin_renew(req, self.set_creds)
        if path == "/stats":
            window = parse_window(req.query.get("window", "60"))
            if window is None:
                return ctlhttp.Response.error(400, "window must be 1..600 seconds")
            return ctlhttp.Response.json(self.stats(window))
        if path == "/routes":   # per-route effective (logical) vs actual (attempt) windows
            window = parse_window(req.query.get("window", "60"))
            if window is None:
                return ctlhttp.Response.error(400, "window must be 1..600 seconds")
            return ctlhttp.Response.json({"workload": self.cfg.workload, "namespace": self.cfg.namespace,
                                          "pod": self.cfg.instance,
                                          **resilience.routes_doc(window, self.started)})
        if path == "/tap":
            try:
                rate = float(req.query.get("max_rps", "100"))
            except ValueError:
                return ctlhttp.Response.error(400, "max_rps must be a number")
            q = req.query
            sub = Subscriber(rate, q.get("method") or None, q.get("path") or None,
                             q.get("authority") or None, clock.monotonic())
            return ctlhttp.Stream(self.tap.stream(sub))
        return ctlhttp.Response.error(404, "not found")

    async def _metrics_chunks(self) -> AsyncIterator[bytes]:
        """Render in bounded chunks, yielding to the loop between them."""
        for chunk in self.metrics.render_chunks():
            if chunk:
                yield chunk
            await asyncio.sleep(0)

    def describe(self) -> dict[str, Any]:
        cfg = self.cfg
        creds = self.creds
        from . import __version__
        return {
            "version": __version__,
            "identity": cfg.identity, "workload": cfg.workload, "namespace": cfg.namespace,
            "instance": cfg.instance, "ports": self.ports, "app_port": cfg.app_port,
            "ready": self.ready()[1], "certificate_valid_until": creds.valid_until if creds else None,
            **describe_creds(creds),  # trust_anchors, certificate (rotation progress)
            "destination": {"reachable": self.discovery.reachable, "registered": self.discovery.registered},
            "policy": self.authz.describe(),
            "resolutions": {a: {"exists": r.exists, "version": r.version, "connected": r.connected,
                                "endpoints": [{"address": f"{e.addr[0]}:{e.addr[1]}", "identity": e.identity,
                                               "labels": e.labels} for e in r.endpoints]}
                            for a, r in self.discovery.resolutions.items()},
            "pools": {f"{k[0][0]}:{k[0][1]}": len(p.idle) for k, p in self.outbound.pools.items()},
            # connections carrying requests: how many are in flight on each (pipelining)
            "pools_busy": {f"{k[0][0]}:{k[0][1]}": [1 + len(up.pipe) for up in p.busy]
                           for k, p in self.outbound.pools.items()},
            "pipelining": {"depth": self.outbound.pipelining.depth, "after": self.outbound.pipelining.after,
                           "max_age_ms": round(self.outbound.pipelining.max_age * 1000.0, 3)},
            "profiles": self.profiles.describe(), "mirrors": self.mirrors.describe(),
            "balancer": resilience.describe(self.discovery.resolutions),
            "connections": len(self.conns),
        }

    # --- shutdown
    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), leave."""
        self.stopping.set()
        for srv in self.servers[:1]:
            srv.close()
        if self._inbound_sock is not None:
            self._inbound_sock.close()
        for conn in list(self.conns):
            conn.graceful_close()
        deadline = self.loop.time() + self.cfg.shutdown_grace
        while self.conns and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.conns):
            conn.transport.abort()
        await self.discovery.deregister()
        if self.tracer is not None:
            await self.tracer.close()   # bounded: spans of the requests that just ended
        self.discovery.close()
        self.profiles.close()
        self.mirrors.close()
        for srv in self.servers[1:]:
            srv.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        log.info("proxy stopped")


def describe_json(proxy: Proxy) -> bytes:
    return json.dumps(proxy.describe()).encode()
