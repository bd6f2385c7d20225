"""The outbound listener of a transparently intercepted pod (``mesh run --netns``).

``microproxy init``'s nat rules REDIRECT every TCP connection the app opens to the
outbound listener (127.0.0.1:4140). Nothing told the app about a proxy, so for each
accepted connection:

1. **Where was it going?** ``SO_ORIGINAL_DST`` (``netutil.original_dst``) gives the
   address the app dialled, e.g. a service's virtual IP ``10.96.0.2:7003`` (destination
   assigns one per service; the pod's /etc/hosts maps ``books.default`` & co to it).
   A connection that reached the listener directly (an explicit ``http_proxy`` user)
   reports the listener's own address: it has no original destination.
2. **What protocol?** Peek (MSG_PEEK, nothing consumed) at the first bytes: an HTTP/1
   method token and a space (or the HTTP/2 preface ``PRI ``) is HTTP; any other first
   bytes (a TLS ClientHello, a database handshake, ...) are opaque; no bytes within
   ``DETECT_TIMEOUT`` (a server-speaks-first protocol) are opaque too.
3. **HTTP** goes to the ordinary outbound router (``ServerConn`` + ``Outbound``),
   which routes by the Host header exactly as for an ``http_proxy`` client: Host is
   ``books.default:7002`` when the app used the name, or the VIP/pod IP when it used an
   address (destination resolves those too).
4. **Opaque** TCP is looked up by its original destination in destination
   (``/v1/endpoints?authority=VIP:PORT`` or ``POD_IP:PORT``), balanced over the
   endpoints (P2C, as HTTP) and carried in the same mTLS ``CONNECT`` tunnel ``Outbound``
   uses: the peer's inbound proxy checks its policy and splices to its app. A
   destination destination does not know (``exists: false``) is passed through as plain
   TCP to the original address (the proxy's uid is exempt from the redirect).

A connection whose original destination port is in ``MESH_OPAQUE_PORTS`` (the
``config.micromesh.io/opaque-ports`` annotation) skips step 2: it is opaque at once, with
no peek and no ``DETECT_TIMEOUT`` wait (Linkerd's opaque ports).
"""
from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

from . import resilience
from .downstream import ServerConn, TunnelPeer
from .netutil import original_dst
from .portranges import in_ranges

log = logging.getLogger(__name__)

DETECT_TIMEOUT = 1.0       # seconds to wait for the client's first bytes before "opaque"
PEEK_BYTES = 8
PARTIAL_WAIT = 0.005       # the method token came in pieces: look again this soon
HTTP_TOKENS = tuple(m + b" " for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT",
                                        b"OPTIONS", b"TRACE", b"PATCH", b"PRI"))


def classify(first: bytes) -> str | None:
    """``"http"``, ``"opaque"``, or None when ``first`` is too short to tell."""
    if not first:
        return None
    if any(first.startswith(tok) for tok in HTTP_TOKENS):
        return "http"
    if any(tok.startswith(first) for tok in HTTP_TOKENS):
        return None
    return "opaque"


def _wake(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


class OpaqueConn(ServerConn):
    """An outbound connection carried as bytes: what arrives before the tunnel to the
    peer is up is held (and reading paused; uvloop starts reading after
    ``connection_made`` whatever it did), then ``splice`` turns it into a pipe."""

    early = b""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.pause("tunnel")

    def data_received(self, data: bytes) -> None:
        if self.tunnel_peer is None:
            self.early += data
            self.read_bytes += len(data)
            self.transport.pause_reading()
            return
        super().data_received(data)

    def splice(self, peer_transport: Any) -> None:
        early, self.early = self.early, b""
        self.start_splice(peer_transport, early)


class _Listener:
    """What ``Proxy.servers`` needs of a listener: ``sockets`` and ``close()``."""

    def __init__(self, sock: socket.socket, task: asyncio.Task[Any]) -> None:
        self.sockets = [sock]
        self._task = task

    def close(self) -> None:
        self._task.cancel()
        self.sockets[0].close()


class TransparentOutbound:
    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy
        self.loop: asyncio.AbstractEventLoop = proxy.loop

    def listen(self, addr: tuple[str, int]) -> _Listener:
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
        return _Listener(sock, self.proxy.spawn(self._accept(sock)))

    async def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                sock, _ = await self.loop.sock_accept(lsock)
            except OSError as e:
                if lsock.fileno() < 0:
                    return
                log.warning("accept failed", extra={"error": repr(e)})
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.proxy.spawn(self._handle(sock))

    async def _peek(self, sock: socket.socket) -> bytes | None:
        """The first bytes, without consuming them; b"" when none came in time; None on EOF."""
        deadline = self.loop.time() + DETECT_TIMEOUT
        fd = sock.fileno()
        while True:
            fut: asyncio.Future[None] = self.loop.create_future()
            self.loop.add_reader(fd, _wake, fut)
            try:
                await asyncio.wait_for(fut, max(deadline - self.loop.time(), 0.0))
                data = sock.recv(PEEK_BYTES, socket.MSG_PEEK)
            except asyncio.TimeoutError:
                return b""
            except OSError:
                return None
            finally:
                self.loop.remove_reader(fd)
            if not data:
                return None
            if classify(data) is not None or len(data) >= PEEK_BYTES or self.loop.time() >= deadline:
                return data
            await asyncio.sleep(PARTIAL_WAIT)

    async def _handle(self, sock: socket.socket) -> None:
        try:
            orig: tuple[str, int] | None = original_dst(sock)
            if orig == tuple(sock.getsockname()[:2]):
                orig = None   # came straight to the listener (an http_proxy client)
        except OSError as e:
            log.debug("no original destination", extra={"error": repr(e)})
            orig = None
        # MESH_OPAQUE_PORTS: no detection (a server-speaks-first protocol would wait it out)
        declared = orig is not None and in_ranges(orig[1], self.proxy.cfg.opaque_ports)
        first = b"" if declared else await self._peek(sock)
        if first is None or self.proxy.stopping.is_set():
            sock.close()
            return
        proxy = self.proxy
        kind = classify(first) or "opaque"
        try:
            if kind == "http" or orig is None:
                await self.loop.connect_accepted_socket(
                    lambda: ServerConn(proxy.outbound, proxy.metrics, proxy.conns, self.loop, "outbound"), sock)
                return
            _, conn = await self.loop.connect_accepted_socket(
                lambda: OpaqueConn(proxy.outbound, proxy.metrics, proxy.conns, self.loop, "outbound"), sock)
        except OSError as e:
            log.info("outbound connection failed", extra={"error": repr(e)})
            sock.close()
            return
        await self._opaque(conn, orig)

    async def _opaque(self, conn: OpaqueConn, orig: tuple[str, int]) -> None:
        proxy = self.proxy
        host = f"[{orig[0]}]" if ":" in orig[0] else orig[0]
        auth = f"{host}:{orig[1]}"
        res = proxy.discovery.get(auth)
        ok = await proxy.outbound._await_endpoints(res)
        if conn.transport.is_closing():
            return
        if not ok:
            if res.exists is False:
                await self._passthrough(conn, orig, auth)
            else:
                log.warning("no endpoints for opaque connection", extra={"authority": auth})
                conn.transport.close()
            return
        ep = res.pick()
        if ep is None:
            log.warning("opaque connection refused", extra={"authority": auth, "reason": resilience.CIRCUIT_OPEN})
            conn.transport.close()
            return
        try:
            transport, peer, code = await proxy.outbound.open_tunnel(conn, ep, auth)
        except (OSError, asyncio.TimeoutError) as e:
            log.warning("opaque connect failed", extra={"authority": auth, "error": repr(e)})
            conn.transport.close()
            return
        if code != 200 or conn.transport.is_closing():
            log.warning("peer refused the opaque tunnel", extra={"authority": auth, "status": code})
            transport.close()
            conn.transport.close()
            return
        if proxy.cfg.access_log:
            log.info("opaque tunnel", extra={"authority": auth, "server_id": ep.identity,
                                             "addr": f"{ep.addr[0]}:{ep.addr[1]}"})
        peer.splice()
        conn.splice(transport)

    async def _passthrough(self, conn: OpaqueConn, orig: tuple[str, int], auth: str) -> None:
        """Not a mesh destination: plain TCP to where the app was going."""
        try:
            transport, peer = await asyncio.wait_for(self.loop.create_connection(
                lambda: TunnelPeer(conn), orig[0], orig[1]), self.proxy.cfg.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            log.info("passthrough connect failed", extra={"authority": auth, "error": repr(e)})
            conn.transport.close()
            return
        peer.splice()
        conn.splice(transport)
