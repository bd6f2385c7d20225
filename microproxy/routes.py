"""HTTPRoute routing in the outbound proxy: the I/O around the pure decisions of
``core.routing`` (select, weighted split, mirror) and ``core.fault``.

Per request, for a service with HTTPRoutes (``Outbound.dispatch`` calls ``route``):

1. ``RouteTable.select(method, path, query, headers)`` -> the ``Route`` (``ex.route``);
   ``route_request_total{dst, rt_route}`` is counted.
2. Fault injection (``fault.micromesh.io/http``): an abort is answered here with its status
   and flag ``FI``; a delay postpones the rest (``loop.call_later``), outside the timeouts.
3. ``choose_backend(route, random())`` -> a backendRef, mapped to the authority
   ``name.namespace:port`` (the service itself keeps the caller's authority); no weight at
   all -> 500. ``RequestHeaderModifier`` is applied to the forwarded head.
4. Each ``RequestMirror`` selected by its percent gets a fire-and-forget copy (mirror.py).
5. Timeouts: ``timeouts.request`` bounds the whole request (retries included);
   ``timeouts.backendRequest`` is set on ``ex.backend_timeout``: with a retry policy it is
   the per-try timeout (``resilience.ReqState.arm``: a cut try is retried); without one it
   bounds the request here (one attempt). ``ResponseHeaderModifier`` is applied by
   ``upstream.UpstreamConn`` to the response head (``ex.route.response_headers``).
   On expiry: the upstream is aborted and the caller gets 504 with
   ``x-mesh-proxy-error: request timeout (...)`` and flag ``UT``. The timer is cancelled
   when the exchange ends (``ex.on_finish``).
6. ``Outbound.resolve_and_send`` (discovery, then ``Outbound.send``).

Services without routes take ``default``: only the ``[DEFAULT]`` route's counters.
``route_response_total{dst, rt_route, classification}`` is counted when the exchange ends.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from .core.fault import decide
from .core.fields import render_duration
from .core.routing import Route, choose_backend, should_mirror, split_target
from .downstream import ServerConn
from .http1 import Exchange
from .metrics import labels
from .profiles import Profile
from .tracing import CLIENT

if TYPE_CHECKING:
    from .outbound import Outbound

ROUTE_REQUESTS = "route_request_total"
ROUTE_RESPONSES = "route_response_total"
MAX_KEYS = 10000


class RouteCounters:
    """A route's label string (``dst``, ``rt_route``, ``rt_namespace``) and the cells of its
    route_request_total and route_response_total{classification} counters."""

    __slots__ = ("route", "base", "requests", "success", "failure")

    def __init__(self, metrics: Any, authority: str, route: Route) -> None:
        self.route = route
        self.base = base = labels(dst=authority, rt_route=route.name, rt_namespace=route.namespace)
        self.requests = metrics.cell(ROUTE_REQUESTS, base)
        self.success = metrics.cell(ROUTE_RESPONSES, base + ',classification="success"')
        self.failure = metrics.cell(ROUTE_RESPONSES, base + ',classification="failure"')


class RouteRouter:
    def __init__(self, outbound: "Outbound") -> None:
        self.outbound = outbound
        self.proxy = outbound.proxy
        # id(route) -> its counters; the route is kept so its id is not reused while the entry lives
        self._keys: dict[int, RouteCounters] = {}
        self.rand = random.random
        self._ended_cb = self._ended   # bound once: ex.on_finish is set for every request

    def keys(self, authority: str, route: Route) -> "RouteCounters":
        """The label string and counter cells of ``route``."""
        entry = self._keys.get(id(route))
        if entry is None or entry.route is not route:
            if len(self._keys) >= MAX_KEYS:
                self._keys.clear()
            entry = self._keys[id(route)] = RouteCounters(self.proxy.metrics, authority, route)
        return entry

    def count(self, ex: Exchange, route: Route) -> None:
        """Count a request on ``route`` (route_request_total) and its response when it ends."""
        self.keys(ex.authority, route).requests[0] += 1
        ex.route = route
        ex.on_finish = self._ended_cb

    def count_response(self, route: Route, failed: bool) -> None:
        entry = self._keys.get(id(route))
        if entry is not None:
            (entry.failure if failed else entry.success)[0] += 1

    def _ended(self, ex: Exchange) -> None:
        t = ex.timer
        if t is not None:
            ex.timer = None
            t.cancel()
        self.count_response(ex.route, ex.status >= 500 or not ex.status)

    def default(self, conn: ServerConn, ex: Exchange, prof: Profile) -> None:
        """No HTTPRoute: the request goes to the authority itself; only counted."""
        if prof.default is not None:
            self.count(ex, prof.default)

    def route(self, conn: ServerConn, ex: Exchange, prof: Profile, host: bytes, path: bytes) -> None:
        table = prof.table
        assert table is not None
        rpath, query = split_target(path)
        route = table.select(ex.method, rpath, query, ex.headers)
        self.count(ex, route)
        if route.fault is not None:
            inject = decide(route.fault, self.rand(), self.rand())
            if inject.delay:
                ex.timer = self.proxy.loop.call_later(inject.delay, self._delayed, conn, ex, prof,
                                                      route, host, path, inject.abort)
                return
            if inject.abort:
                conn.respond_error(ex, inject.abort, "fault injected: abort", "FI")
                return
        self._forward(conn, ex, prof, route, host, path)

    def _delayed(self, conn: ServerConn, ex: Exchange, prof: Profile, route: Route, host: bytes,
                 path: bytes, abort: int) -> None:
        ex.timer = None
        if ex.done:
            return
        if abort:
            conn.respond_error(ex, abort, "fault injected: abort (after a delay)", "FI")
            return
        self._forward(conn, ex, prof, route, host, path)

    def _forward(self, conn: ServerConn, ex: Exchange, prof: Profile, route: Route, host: bytes,
                 path: bytes) -> None:
        auth = backend_authority(prof, route, ex.authority, self.rand())
        if auth is None:
            conn.respond_error(ex, 500, f"route {route.name}: every backend has weight 0", "NR")
            return
        extra, drop, new_host = header_changes(route)
        if new_host is not None:
            host = new_host
        tracer = self.proxy.tracer
        ex.wire_head = ex.head(path, host, extra, drop) if tracer is None else \
            ex.head(path, host, *tracer.begin(ex, CLIENT, path, extra, drop))
        for m in route.mirrors:
            if should_mirror(m, self.rand()):
                b = m.backend
                self.proxy.mirrors.send(ex, f"{b.name}.{b.namespace}:{b.port}", ex.wire_head)
        t = route.timeouts
        if t.request or t.backend_request:
            ex.backend_timeout = t.backend_request
            secs, what = t.request, "timeouts.request"
            if route.retry is None and t.backend_request and (not secs or t.backend_request < secs):
                secs, what = t.backend_request, "timeouts.backendRequest"
            if secs:
                ex.timer = self.proxy.loop.call_later(
                    secs, self._timeout, conn, ex, f"request timeout ({what} {render_duration(secs)})")
        self.outbound.resolve_and_send(conn, ex, auth)

    @staticmethod
    def _timeout(conn: ServerConn, ex: Exchange, reason: str) -> None:
        ex.timer = None
        if ex.done:
            return
        up: Any = ex.upstream
        if up is not None:
            ex.upstream = None
            up.abort()   # the response, if any, has nowhere to go now
        conn.respond_error(ex, 504, reason, "UT")


def backend_authority(prof: Profile, route: Route, authority: str, r: float) -> str | None:
    """The authority of the backend ``route`` picks with the random float ``r`` (the caller's
    ``authority`` when it is the parent service itself); None when every weight is 0."""
    backend = choose_backend(route, r)
    if backend is None:
        return None
    table = prof.table
    if table is not None and backend.name == table.service \
            and backend.namespace == table.namespace and backend.port == table.port:
        return authority
    return f"{backend.name}.{backend.namespace}:{backend.port}"


def header_changes(route: Route) -> tuple[list[tuple[bytes, bytes]], frozenset[bytes], bytes | None]:
    """(headers to add, header names to drop, a new Host or None) for the route's
    RequestHeaderModifier. A Host it sets or adds replaces the request's (HTTP/1 ``Host``,
    HTTP/2 ``:authority``) instead of being sent twice."""
    mod = route.request_headers
    if mod is None:
        return [], frozenset(), None
    drop = frozenset(n.encode() for n in mod.remove) | frozenset(n.encode() for n, _ in mod.set)
    extra, host = [], None
    for n, v in mod.set + mod.add:
        if n.lower() == "host":
            host = v.encode()
        else:
            extra.append((n.encode(), v.encode()))
    return extra, drop, host
