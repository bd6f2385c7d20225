"""The proxy process: listeners, credentials, control-plane watches, admin, lifecycle. The
routers are outbound.py (app -> services, over mTLS) and inbound.py (peers -> the app)."""
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
from .discovery import Discovery
from .downstream import ServerConn
from .identity_client import Credentials, IdentityClient, describe_creds, refresh_in
from .inbound import Inbound
from .metrics import CONTENT_TYPE, Metrics, labels
from .mirror import Mirrors
from .observe import Subscriber, TapHub
from .outbound import HANDSHAKE_TIMEOUT, Outbound
from .profiles import Profiles
from .tracing import build_tracer

log = logging.getLogger(__name__)

DETECT_TIMEOUT = 10.0
SWEEP_INTERVAL = 5.0
IDLE_TIMEOUT = 90.0          # downstream keep-alive connections with nothing in flight
HEADER_TIMEOUT = 10.0        # a request head must arrive this fast (slowloris)


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
            for router in (self.outbound, self.inbound):   # HTTP/2 pools, once HTTP/2 showed up
                h2r = router.__dict__.get("h2_router")
                if h2r is not None:
                    h2r.sweep(now)
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
