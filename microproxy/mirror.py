"""RequestMirror: fire-and-forget copies of requests to a mirror service.

- ``Mirrors.send(ex, authority, head)`` is called by the outbound router for each request a
  route's ``RequestMirror`` filter selects. A request without a body is copied at once. A
  request with a body is copied once its body is complete, if it is at most ``MAX_BODY``
  (64 KiB): a ``Tee`` on the exchange (``ex.tee``) keeps a copy of the framed body bytes as
  they stream to the real backend (which is never held back); a larger body abandons the copy
  (``mirror_skipped_total``), and so does a request the client gives up before its end.
- At most ``MAX_IN_FLIGHT`` copies are in flight per proxy; beyond that a copy is dropped
  and counted in ``mirror_dropped_total``. Each copy has ``MIRROR_TIMEOUT`` seconds in all
  (endpoint lookup, connect, response); a slow or failing mirror only costs its own task.
- A copy goes over mTLS to one endpoint of the mirror service (its inbound proxy), on a
  small keep-alive pool of ``MirrorConn`` protocols that parse and discard the response.
  Nothing of it reaches the caller: not the status, not the body, not an error.
- Metrics: ``mirror_request_total`` / ``mirror_response_total`` / ``mirror_error_total``
  (label ``dst``: the mirror authority), ``mirror_dropped_total``, ``mirror_skipped_total``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import httptools

from .metrics import labels

if TYPE_CHECKING:
    from .proxy import Proxy

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 100
MIRROR_TIMEOUT = 5.0
MAX_IDLE = 16
MAX_BODY = 64 * 1024


class Tee:
    """The copies of one request waiting for its body: (authority, head, metric key)."""

    __slots__ = ("mirrors", "copies", "parts", "size")

    def __init__(self, mirrors: "Mirrors", first: bytes) -> None:
        self.mirrors = mirrors
        self.copies: list[tuple[str, bytes, str]] = []
        self.parts = [first] if first else []
        self.size = len(first)

    def feed(self, ex: Any, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_BODY:
            ex.tee = None
            for _, _, key in self.copies:
                self.mirrors.proxy.metrics.inc("mirror_skipped_total", key)
            return
        self.parts.append(data)

    def done(self, ex: Any, trailer: bytes) -> None:
        ex.tee = None
        body = b"".join(self.parts) + trailer
        for authority, head, key in self.copies:
            self.mirrors._launch(authority, head + body, key)


class MirrorConn(asyncio.Protocol):
    """One mirrored request at a time; the response is parsed only to find its end."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[bool] | None = None
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError("mirror connection lost"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            w = self.waiter
            if w is not None and not w.done():
                w.set_exception(ConnectionError(f"malformed mirror response: {e}"))
            self.abort()

    def on_message_complete(self) -> None:
        if 100 <= self.parser.get_status_code() < 200:
            return
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(self.parser.should_keep_alive())

    def request(self, head: bytes) -> asyncio.Future[bool]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(head)
        return self.waiter

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.abort()


class Mirrors:
    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.in_flight = 0
        self.idle: dict[tuple[tuple[str, int], str], list[MirrorConn]] = {}
        self.keys: dict[str, str] = {}

    def send(self, ex: Any, authority: str, head: bytes) -> None:
        metrics = self.proxy.metrics
        key = self.keys.get(authority)
        if key is None:
            if len(self.keys) > 1000:
                self.keys.clear()
            key = self.keys[authority] = labels(dst=authority)
        if ex.chunked or ex.length:
            if (ex.length or 0) > MAX_BODY:
                metrics.inc("mirror_skipped_total", key)
                return
            if ex.body_done:   # the whole body is already here (not sent yet: routing comes first)
                self._launch(authority, head + b"".join(ex.body), key)
                return
            if ex.tee is None:
                ex.tee = Tee(self, b"".join(ex.body))
                if ex.tee.size > MAX_BODY:
                    ex.tee = None
                    metrics.inc("mirror_skipped_total", key)
                    return
            ex.tee.copies.append((authority, head, key))
            return
        self._launch(authority, head, key)

    def _launch(self, authority: str, head: bytes, key: str) -> None:
        metrics = self.proxy.metrics
        if self.in_flight >= MAX_IN_FLIGHT:
            metrics.inc("mirror_dropped_total", key)
            return
        self.in_flight += 1
        metrics.inc("mirror_request_total", key)
        self.proxy.spawn(self._run(authority, head, key))

    async def _run(self, authority: str, head: bytes, key: str) -> None:
        try:
            await asyncio.wait_for(self._send(authority, head), MIRROR_TIMEOUT)
            self.proxy.metrics.inc("mirror_response_total", key)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a mirror's failure is its own
            self.proxy.metrics.inc("mirror_error_total", key)
            log.debug("mirror request failed", extra={"authority": authority, "error": repr(e)})
        finally:
            self.in_flight -= 1

    async def _send(self, authority: str, head: bytes) -> None:
        proxy = self.proxy
        res = proxy.discovery.get(authority)
        while not (res.exists and res.endpoints):
            if res.exists is False:
                raise LookupError(f"no such mirror service {authority}")
            await res.changed.wait()
        ep = res.pick()
        assert ep is not None and proxy.creds is not None
        k = (ep.addr, ep.identity)
        idle = self.idle.get(k)
        conn: MirrorConn | None = None
        while idle:
            c = idle.pop()
            if not c.closed:
                conn = c
                break
        if conn is None:
            _, conn = await proxy.loop.create_connection(
                MirrorConn, ep.addr[0], ep.addr[1],
                ssl=None if ep.identity is None else proxy.creds.client_ctx,  # None: unmeshed, plaintext
                server_hostname=ep.identity)
        try:
            keep = await conn.request(head)
        except BaseException:
            conn.abort()
            raise
        if keep and not conn.closed and len(self.idle.setdefault(k, [])) < MAX_IDLE:
            self.idle[k].append(conn)
        else:
            conn.abort()

    def describe(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "idle": sum(len(v) for v in self.idle.values())}

    def close(self) -> None:
        for conns in self.idle.values():
            for c in conns:
                c.abort()
        self.idle.clear()
