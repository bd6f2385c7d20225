"""Outbound HTTP/2 streams (and so gRPC calls): the app's stream -> its service's endpoints.

Each stream's ``:authority`` is resolved like an HTTP/1 ``Host``; the service's HTTPRoutes
apply as for HTTP/1 (routes.py: match, weighted backends, header modifiers, timeouts,
faults); the stream is admitted under the service's pending limit, an endpoint is picked
(P2C over peak-EWMA) and the stream opened on that endpoint's pooled mTLS connection
(ALPN h2). With a retry policy, what is forwarded upstream is kept (at most 64 KiB) and a
failure known before anything reached the caller (a trailers-only gRPC status or an HTTP
status in the response head, or no answer at all) is retried after a backoff, within the
retry budget (core/retry.py decides, as for HTTP/1); ``timeouts.backendRequest`` or
``retry.linkerd.io/timeout`` then bounds each try, and a retry carries what is left of the
call's ``grpc-timeout``.
"""
from __future__ import annotations

import asyncio
import logging
import random
from time import perf_counter
from typing import Any

from h2.errors import ErrorCodes

from . import clock, grpc, resilience
from .core import retry
from .core.breaker import ADMIT
from .core.fault import decide
from .core.fields import render_duration
from .core.routing import split_target
from .h2ends import H2ClientConn, H2Pool, H2ServerConn, Overflow
from .h2proxy import HANDSHAKE_TIMEOUT, Router2, h2_client_context
from .h2stream import H2Exchange
from .outbound import normalize_authority
from .resilience import ROUTES
from .routes import backend_authority, header_changes
from .tracing import CLIENT

log = logging.getLogger(__name__)


class Outbound2(Router2):
    """The app's HTTP/2 streams: resolve each stream's :authority, pick an endpoint, forward
    over the endpoint's pooled mTLS HTTP/2 connection."""

    direction = "outbound"

    def __init__(self, proxy: Any) -> None:
        super().__init__(proxy)
        self.pools: dict[tuple[tuple[str, int], str], H2Pool] = {}

    def dispatch(self, conn: H2ServerConn, x: H2Exchange) -> None:
        host = None
        for name, value in x.headers:
            if name == b":authority":
                host = value
                break
            if name == b"host" and host is None:
                host = value
        auth = normalize_authority(host) if host else None
        if auth is None:
            self.fail(x, 400, "no valid :authority in request")
            return
        x.authority = auth
        self.arm_deadline(x)   # grpc-timeout runs from the call's arrival
        prof = self.proxy.profiles.get(auth)
        if prof.table is None:   # the routes of a new authority are not known yet
            self.proxy.spawn(self._wait_profile(x, prof))
            return
        self.route(x, prof)

    async def _wait_profile(self, x: H2Exchange, prof: Any) -> None:
        try:
            await asyncio.wait_for(prof.ready.wait(), self.proxy.cfg.failfast_timeout)
        except asyncio.TimeoutError:
            log.info("routes not known in time; using the default route", extra={"authority": prof.authority})
        if not x.done:
            self.route(x, prof)

    # --- HTTPRoutes, as for HTTP/1 (routes.py): match, fault, backend split, header
    # modifiers and timeouts; no retries or mirrors for HTTP/2 streams
    def route(self, x: H2Exchange, prof: Any) -> None:
        if not prof.routed or prof.table is None:
            if prof.default is not None:
                self._count(x, prof.default)
            self.resolve(x, x.authority)
            return
        path, query = split_target(x.pseudo(b":path"))
        route = prof.table.select(x.pseudo(b":method"), path, query, x.headers)
        self._count(x, route)
        if route.fault is not None:
            rand = self.proxy.outbound.routing.rand
            inject = decide(route.fault, rand(), rand())
            if inject.delay:
                x.delay = self.loop.call_later(inject.delay, self._delayed, x, prof, route, inject.abort)
                return
            if inject.abort:
                self.fail(x, inject.abort, "fault injected: abort")
                return
        self._forward(x, prof, route)

    def _count(self, x: H2Exchange, route: Any) -> None:
        x.route = route
        self.proxy.outbound.routing.keys(x.authority, route).requests[0] += 1

    def _delayed(self, x: H2Exchange, prof: Any, route: Any, abort: int) -> None:
        x.delay = None
        if x.done:
            return
        if abort:
            self.fail(x, abort, "fault injected: abort (after a delay)")
            return
        self._forward(x, prof, route)

    def _forward(self, x: H2Exchange, prof: Any, route: Any) -> None:
        auth = backend_authority(prof, route, x.authority, self.proxy.outbound.routing.rand())
        if auth is None:
            self.fail(x, 500, f"route {route.name}: every backend has weight 0")
            return
        t = route.timeouts
        secs, what = t.request, "timeouts.request"
        if resilience.policy_of(x)[0] is None and t.backend_request and (not secs or t.backend_request < secs):
            # no retries: the shorter of the two bounds the response (with a retry policy,
            # backendRequest bounds each try instead: attempt() arms it)
            secs, what = t.backend_request, "timeouts.backendRequest"
        self.arm_deadline(x, secs, f"request timeout ({what} {render_duration(secs)})" if secs else "")
        self.resolve(x, auth)

    def resolve(self, x: H2Exchange, auth: str) -> None:
        res = self.proxy.discovery.get(auth)
        if res.exists and res.endpoints:
            self.send(x, res)
        elif res.exists is False:
            self.fail(x, 503, f"unknown service {auth}")
        else:
            self.proxy.spawn(self._wait_then_send(x, res))

    async def _wait_then_send(self, x: H2Exchange, res: Any) -> None:
        ok = await self.proxy.outbound._await_endpoints(res)
        if x.done:
            return
        if ok:
            self.send(x, res)
        elif res.exists is False:
            self.fail(x, 503, f"unknown service {res.authority}")
        else:
            self.fail(x, 503, f"no endpoints for {res.authority} (fail-fast)")

    def send(self, x: H2Exchange, res: Any) -> None:
        """Admit the stream (the per-service pending limit, as for HTTP/1), take its route's
        retry policy, and send the first attempt."""
        adm = res.svc.admission
        verdict = adm.request()
        if verdict is not ADMIT:
            self.fail(x, 503, verdict.reason)
            return
        x.admitted = adm
        x.res = res
        policy, name = resilience.policy_of(x)
        x.route_key = ROUTES.key(res.authority, name)
        res.svc.budget.deposit(clock.monotonic())   # every call earns the budget (as HTTP/1)
        if policy is not None:
            x.policy = policy
            x.down.kept = []   # keep what is forwarded, to send it again
        self.attempt(x, first=True)

    def attempt(self, x: H2Exchange, first: bool = False) -> None:
        res = x.res
        ep = res.pick()
        if ep is None:
            self.fail(x, 503, "all endpoints are failing (circuit open)")
            return
        proxy = self.proxy
        x.lb = ep.lb
        x.endpoint = ep
        x.tried_at = perf_counter()
        ep.lb.begin(clock.monotonic())
        x.metric_key = ep.metric_key
        if first:
            proxy.metrics.request(ep.metric_key)
        if ep.metric_key not in proxy.metrics.window.info:
            proxy.metrics.window.describe(
                ep.metric_key, direction="outbound", authority=x.authority, server_id=ep.identity,
                dst_workload=ep.labels.get("workload"), dst_namespace=ep.labels.get("namespace"),
                dst_pod=ep.labels.get("pod"), tls=True)
        if proxy.tap.subs and x.tap is None:
            self.tap(x, {"workload": ep.labels.get("workload"), "namespace": ep.labels.get("namespace"),
                         "identity": ep.identity, "addr": f"{ep.addr[0]}:{ep.addr[1]}"})
        headers = x.sent_headers
        if headers is not None and x.timer is not None:   # a retry: what is left of the deadline
            headers = with_grpc_timeout(headers, x.timer.when() - self.loop.time())
        if headers is None:   # the first attempt (a retry sends the same, trace context included)
            extra, drop, new_host = header_changes(x.route) if x.route is not None else ([], frozenset(), None)
            headers = self.trace(x, CLIENT, extra, drop)
            if new_host is not None:   # a route's Host is the :authority here
                headers = [(b":authority", new_host) if h[0] == b":authority" else h for h in headers
                           if h[0] != b"host"]
            if x.policy is not None:
                x.sent_headers = headers
        self._arm_try(x)
        pool = self.pool(ep)
        c = pool.take()
        if c is not None:
            self.open_upstream(x, c, headers)
        else:
            proxy.spawn(self._connect_then_open(x, pool, headers, ep))

    def _arm_try(self, x: H2Exchange) -> None:
        """With a retry policy, the per-try timeout of the attempt just begun: the route's
        ``timeouts.backendRequest`` and/or ``retry.linkerd.io/timeout``, the shorter (as HTTP/1)."""
        policy = x.policy
        if policy is None:
            return
        backend = x.route.timeouts.backend_request if x.route is not None else None
        tries = [v for v in (backend, policy.timeout) if v]
        if not tries:
            return
        secs = min(tries)
        what = "timeouts.backendRequest" if secs == backend else "retry.linkerd.io/timeout"
        x.try_timer = self.loop.call_later(secs, self._try_timeout, x, x.tried_at,
                                           f"request timeout ({what} {render_duration(secs)})")

    def _try_timeout(self, x: H2Exchange, tried_at: float, reason: str) -> None:
        x.try_timer = None
        if x.done or x.tried_at != tried_at or x.status != 0:
            return   # another attempt by now, or this one's answer began
        if self.retry(x, None, None, retry.TRY_TIMEOUT):
            return
        self.fail(x, 504, reason, grpc.DEADLINE_EXCEEDED)

    # --- retries (the route's policy; core/retry.py decides, as for HTTP/1)
    def retry(self, x: H2Exchange, status: int | None, grpc_status: int | None,
              timeout: str | None = None) -> bool:
        """The attempt in flight failed before anything was forwarded to the caller: True
        when it is being retried (then nothing of it may be forwarded), else False."""
        policy = x.policy
        if policy is None or x.done:
            return False
        down = x.down
        body_len = down.kept_len if down.kept is not None and down.rx_done else None
        now = clock.monotonic()
        deadline = None if x.timer is None else now + (x.timer.when() - self.loop.time())
        d = retry.decide(policy, x.res.svc.budget, retries=x.retries, status=status,
                         grpc_status=grpc_status, body_len=body_len, now=now,
                         rand=random.random(), deadline=deadline, timeout=timeout)
        if d is retry.BUDGET:
            self.proxy.metrics.inc("retry_budget_exhausted_total", x.route_key)
        if not isinstance(d, retry.Retry):
            if x.retries:
                x.flag = "URX"
            return False
        if x.try_timer is not None:
            x.try_timer.cancel()
            x.try_timer = None
        failed = status is None or status >= 500 or grpc_status in grpc.BREAKER_CODES
        t = perf_counter()
        lb, x.lb = x.lb, None
        if lb is not None:
            lb.end(now, None if status is None else t - x.tried_at, failed)
        ROUTES.actual.add(x.route_key, True, (t - x.tried_at) * 1000.0, t)
        x.tried_at = 0.0
        up, x.up = x.up, None
        down.peer = None
        if up is not None:
            up.peer = None
            up.reset(ErrorCodes.CANCEL)
            if up.conn.dirty:
                up.conn.flush()
        if down.early is None:   # what the caller still sends waits for the next attempt
            down.early = []      # (a try that never opened keeps what it had not sent yet)
        x.status, x.resp_at, x.grpc_status = 0, 0.0, None
        x.retries += 1
        self.proxy.metrics.inc("route_retry_total", x.route_key)
        x.delay = self.loop.call_later(d.after, self._resend, x)
        return True

    def _resend(self, x: H2Exchange) -> None:
        x.delay = None
        down = x.down
        if x.done or down.sid not in down.conn.streams:
            return
        down.early = (down.kept or []) + (down.early or [])
        down.kept, down.kept_len = [], 0   # open_upstream keeps them again as it sends them
        self.attempt(x)

    async def _connect_then_open(self, x: H2Exchange, pool: H2Pool, headers: Any, ep: Any) -> None:
        tried = x.tried_at   # this attempt: if its try timed out meanwhile, another owns x
        try:
            c = await pool.get(x.res.svc.admission)
        except Overflow as e:   # MESH_MAX_CONNECTIONS_PER_SERVICE
            if x.tried_at == tried:
                self.fail(x, 503, str(e))
            return
        except (OSError, asyncio.TimeoutError, ConnectionError) as e:
            if x.tried_at != tried:
                return
            if x.policy is not None and self.retry(x, None, None):
                return
            self.fail(x, 502, f"connect to {ep.addr[0]}:{ep.addr[1]} failed: {type(e).__name__}")
            return
        if x.tried_at == tried:
            self.open_upstream(x, c, headers)

    def pool(self, ep: Any) -> H2Pool:
        key = (ep.addr, ep.identity)
        pool = self.pools.get(key)
        if pool is None:
            proxy = self.proxy

            async def connect(p: H2Pool) -> H2ClientConn:
                creds = proxy.creds
                transport, c = await asyncio.wait_for(proxy.loop.create_connection(
                    lambda: H2ClientConn(proxy.loop, p), ep.addr[0], ep.addr[1],
                    ssl=h2_client_context(creds), server_hostname=ep.identity,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT),
                    proxy.cfg.connect_timeout + HANDSHAKE_TIMEOUT)
                sslobj = transport.get_extra_info("ssl_object")
                if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
                    transport.close()
                    raise ConnectionError("peer proxy did not accept ALPN h2")
                return c  # type: ignore[no-any-return]

            pool = self.pools[key] = H2Pool(connect)
        return pool

    def sweep(self, now: float) -> None:
        for pool in list(self.pools.values()):
            pool.sweep(now)


def with_grpc_timeout(headers: list[tuple[bytes, bytes]], left: float) -> list[tuple[bytes, bytes]]:
    """A retry's headers with ``grpc-timeout`` lowered to what is ``left`` of the call's
    deadline (seconds), if the call carried one: the backend must not think it has more."""
    value = grpc_timeout_value(left)
    return [(b"grpc-timeout", value) if h[0] == b"grpc-timeout" else h for h in headers]


def grpc_timeout_value(seconds: float) -> bytes:
    """A ``grpc-timeout`` value (at most 8 digits, gRPC's limit) of at least ``seconds``
    rounded down to its unit, 1 ms at least."""
    for unit, per in ((b"m", 1000.0), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        n = int(seconds * per)
        if n < 100_000_000:
            return b"%d%s" % (max(1, n), unit)
    return b"99999999H"
