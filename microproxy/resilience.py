"""Resilience on the outbound path: P2C peak-EWMA balancing, failure accrual, per-service
pool limits and retries with budgets. The decisions are the pure cores in ``core/``
(``balance``, ``breaker``, ``retry``); this module holds their per-proxy state and the
glue the proxy calls on the data path.

Theory of operation
-------------------
- Every ``Resolution`` (one authority) keeps one ``core.balance.Endpoint`` per endpoint
  address, surviving snapshot updates (``balancer_for``), and one ``Service``: the
  ``Admission`` counters (Istio's connection-pool limits) and the retry ``Budget``.
- A logical request gets a ``ReqState`` (``ex.rs``) when the outbound router first sends
  it. Each *attempt* brackets one endpoint: ``begin`` when the request is sent, ``end``
  when the response head arrives (rtt = time to head, failed = 5xx) or the attempt fails
  (connect error, connection lost: no rtt, failed). ``ServerConn.finish`` (and the
  client leaving) calls ``ReqState.finish``, which frees the admission slot, cancels an
  attempt still open, and counts the logical request for ``/routes``.
- Retries: after a failed attempt ``core.retry.decide`` answers ``Retry(after)`` or
  ``GiveUp``. On a retryable response head, the upstream does *not* forward the head: it
  drains (or closes) that response and the request is sent again ``after`` seconds later
  to a newly picked endpoint. When retries are exhausted the last response is forwarded
  and the access log gets flag ``URX``.
- Per-try timeout: with a retry policy, ``arm`` starts a timer per attempt
  (``timeouts.backendRequest`` / ``retry.linkerd.io/timeout``, the shorter); on expiry the
  attempt is aborted and ``decide(timeout=TRY_TIMEOUT)`` retries it or the caller gets 504
  (flag ``UT``). ``gen`` numbers the attempts so a connect that completes for an abandoned
  attempt is released instead of used.

Configuration (environment of the client proxy; read once):

| variable | default | meaning |
|---|---|---|
| MESH_FAILURE_ACCRUAL | `consecutive` | `consecutive[:N]` (N failures, default 7) or `off` |
| MESH_MAX_PENDING_REQUESTS | unlimited | per service: requests in flight (Istio http1MaxPendingRequests) |
| MESH_MAX_CONNECTIONS_PER_SERVICE | unlimited | per service: open upstream connections (Istio maxConnections) |
| MESH_DEFAULT_RETRY | none | test/ops default retry policy for requests with no HTTPRoute rule, e.g. `5xx:2` (codes:retries) |
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any

from .core import balance, breaker, retry
from .core.fields import render_duration
from .core.routing import DEFAULT_NAME
from .metrics import labels
from .observe import Window

if TYPE_CHECKING:
    from .downstream import ServerConn
    from .http1 import Exchange
    from .upstream import UpstreamConn

CIRCUIT_OPEN = "all endpoints are failing (circuit open)"


# === settings ===

class Settings:
    def __init__(self, env: Mapping[str, str]) -> None:
        mode = (env.get("MESH_FAILURE_ACCRUAL") or "consecutive").strip().lower()
        name, _, n = mode.partition(":")
        if name == "off":
            self.breaker: breaker.BreakerConfig | None = None
        elif name == "consecutive":
            self.breaker = breaker.BreakerConfig(max_failures=int(n)) if n else breaker.DEFAULT_BREAKER
        else:
            raise ValueError(f"MESH_FAILURE_ACCRUAL={mode!r}: want consecutive[:N] or off")
        self.limits = breaker.PoolLimits(
            int(env.get("MESH_MAX_PENDING_REQUESTS") or breaker.UNLIMITED),
            int(env.get("MESH_MAX_CONNECTIONS_PER_SERVICE") or breaker.UNLIMITED))
        self.default_retry = parse_default_retry(env.get("MESH_DEFAULT_RETRY") or "")


def parse_default_retry(text: str) -> retry.RetryPolicy | None:
    """``5xx:2`` / ``502,503:3`` -> a policy retrying those statuses up to N times."""
    if not text:
        return None
    codes, _, limit = text.partition(":")
    annotations = {retry.HTTP: codes, retry.LIMIT: limit or "1"}
    return retry.from_annotations(annotations, "MESH_DEFAULT_RETRY")


_settings: Settings | None = None


def settings() -> Settings:
    global _settings
    if _settings is None:
        _settings = Settings(os.environ)
    return _settings


def configure(s: Settings) -> None:
    """Tests: replace the settings read from the environment."""
    global _settings
    _settings = s


# === per-service state ===

class Service:
    __slots__ = ("authority", "admission", "budget")

    def __init__(self, authority: str) -> None:
        self.authority = authority
        self.admission = breaker.Admission(settings().limits)
        self.budget = retry.Budget()


def new_endpoint(now: float) -> balance.Endpoint:
    cfg = settings().breaker
    return balance.Endpoint(None, now, breaker.Breaker(cfg) if cfg is not None else None)


def state_of(e: balance.Endpoint, now: float) -> str:
    b = e.breaker
    if b is None or b.state == breaker.CLOSED:
        return "ready"
    if b.state == breaker.OPEN:
        return "open" if now < b.reopen_at else "pending"   # pending: the next request probes
    return "pending"                                        # probation: one probe in flight


# === route stats (effective = logical requests, actual = attempts) ===

class RouteStats:
    """Per-route windows. A request answered by its first attempt is one logical request
    and one attempt: it is added once, to ``both``. A retried request adds its logical
    outcome to ``effective`` and each attempt to ``actual``. So effective = both +
    effective, actual = both + actual, at one window update per request when nothing is
    retried."""

    def __init__(self) -> None:
        self.both = Window()
        self.effective = Window()
        self.actual = Window()
        self.keys: dict[tuple[str, str], str] = {}

    def key(self, authority: str, route: str) -> str:
        k = self.keys.get((authority, route))
        if k is None:
            if len(self.keys) > 10000:
                self.keys.clear()
            k = self.keys[(authority, route)] = labels(authority=authority, route=route)
            for w in (self.both, self.effective, self.actual):
                w.describe(k, authority=authority, route=route)
        return k

    def rows(self, window: int, now: float) -> list[dict[str, Any]]:
        def by_route(w: Window) -> dict[tuple[str, str], dict[str, Any]]:
            return {(r["authority"], r["route"]): r for r in w.summary(window, now)["outbound"]}
        both, eff, act = by_route(self.both), by_route(self.effective), by_route(self.actual)
        empty = {"requests": 0, "success": 0, "failure": 0, "latency_ms_buckets": []}
        out = []
        for key in sorted(set(both) | set(eff) | set(act)):
            b = both.get(key, empty)
            out.append({"authority": key[0], "route": key[1],
                        "effective": merge_rows(b, eff.get(key, empty)),
                        "actual": merge_rows(b, act.get(key, empty))})
        return out


def merge_rows(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """The sum of two summary rows (counts and latency buckets)."""
    ba, bb = a["latency_ms_buckets"], b["latency_ms_buckets"]
    n = max(len(ba), len(bb))
    return {"requests": a["requests"] + b["requests"], "success": a["success"] + b["success"],
            "failure": a["failure"] + b["failure"],
            "latency_ms_buckets": [(ba[i] if i < len(ba) else 0) + (bb[i] if i < len(bb) else 0)
                                   for i in range(n)]}


ROUTES = RouteStats()


# === one logical request ===

class ReqState:
    __slots__ = ("out", "conn", "res", "svc", "lb", "t0", "retries", "body", "policy",
                 "route_key", "admitted", "gen", "try_timer", "first")

    def __init__(self, out: Any, conn: "ServerConn", res: Any, svc: Service,
                 policy: retry.RetryPolicy | None, route_key: str) -> None:
        self.out, self.conn, self.res, self.svc = out, conn, res, svc
        self.lb: balance.Endpoint | None = None   # the endpoint of the attempt in flight
        self.t0 = 0.0
        self.retries = 0
        self.body: bytes | None = None            # the framed request body, kept for a retry
        self.policy = policy
        self.route_key = route_key
        self.admitted = True
        self.gen = 0                              # attempt number: a late connect of an old one is dropped
        self.try_timer: Any = None                # the per-try timeout of the attempt in flight
        self.first: tuple[bool, float] | None = None   # the first attempt's (failed, ms), once ended

    # --- attempts
    def begin(self, lb: balance.Endpoint, now: float) -> None:
        self.lb, self.t0 = lb, now
        self.gen += 1
        lb.begin(now)

    def arm(self, ex: "Exchange") -> None:
        """Start the per-try timeout of the attempt just begun: with a retry policy, the
        route's ``timeouts.backendRequest`` and/or ``retry.linkerd.io/timeout`` (the shorter)."""
        if self.policy is None:
            return
        tries = [t for t in (ex.backend_timeout, self.policy.timeout) if t]
        if not tries:
            return
        secs = min(tries)
        what = "timeouts.backendRequest" if secs == ex.backend_timeout else "retry.linkerd.io/timeout"
        self._disarm()
        self.try_timer = self.out.proxy.loop.call_later(
            secs, self._try_timeout, ex, self.gen, f"request timeout ({what} {render_duration(secs)})")

    def _disarm(self) -> None:
        t = self.try_timer
        if t is not None:
            self.try_timer = None
            t.cancel()

    def _try_timeout(self, ex: "Exchange", gen: int, reason: str) -> None:
        self.try_timer = None
        if ex.done or gen != self.gen or ex.resp_started:
            return
        up: Any = ex.upstream
        if up is not None:
            ex.upstream = None
            up.abort()   # that attempt's response, if any, has nowhere to go now
        now = monotonic()
        self._end(None, now)
        d = retry.decide(self.policy, self.svc.budget, retries=self.retries, status=None,
                         body_len=self.body_len(ex), now=now, rand=random.random(),
                         timeout=retry.TRY_TIMEOUT)
        if d is retry.BUDGET:
            self.out.proxy.metrics.inc("retry_budget_exhausted_total", self.route_key)
        if isinstance(d, retry.Retry):
            self.gen += 1   # a connect still in progress belongs to the abandoned attempt
            self._schedule(ex, d.after)
            return
        self.conn.respond_error(ex, 504, reason, "URX,UT" if self.retries else "UT")

    def restart(self) -> None:
        """The same endpoint again (a stale pooled connection): not a new attempt."""
        lb = self.lb
        if lb is not None:
            lb.cancel()
            lb.begin(monotonic())

    def _end(self, status: int | None, now: float) -> bool:
        if self.try_timer is not None:
            self._disarm()
        failed = status is None or status >= 500
        lb = self.lb
        if lb is not None:
            self.lb = None   # (the random draw only jitters a breaker's penalty after a failure)
            lb.end(now, None if status is None else now - self.t0, failed, random.random() if failed else 0.0)
        ms = (now - self.t0) * 1000.0
        if self.retries:
            ROUTES.actual.add(self.route_key, failed, ms, perf_counter())
        else:   # counted with the logical request at finish(), unless it is retried
            self.first = (failed, ms)
        return failed

    def body_len(self, ex: "Exchange") -> int | None:
        if not ex.chunked and not ex.length:
            return 0
        return None if self.body is None else len(self.body)

    def _decide(self, ex: "Exchange", status: int | None, now: float) -> retry.Retry | retry.GiveUp:
        d = retry.decide(self.policy, self.svc.budget, retries=self.retries, status=status,
                         body_len=self.body_len(ex), now=now, rand=random.random())
        if d is retry.BUDGET:
            self.out.proxy.metrics.inc("retry_budget_exhausted_total", self.route_key)
        return d

    def _schedule(self, ex: "Exchange", after: float) -> None:
        first = self.first
        if first is not None:   # the first attempt is retried: it is an attempt of its own
            self.first = None
            ROUTES.actual.add(self.route_key, first[0], first[1], perf_counter())
        self.retries += 1
        ex.attempts += 1
        ex.upstream = None
        ex.body_sent = False
        ex.body = [self.body] if self.body else []
        self.out.proxy.metrics.inc("route_retry_total", self.route_key)
        self.out.proxy.loop.call_later(after, self._resend, ex)

    def _resend(self, ex: "Exchange") -> None:
        if not ex.done:
            self.out.send(self.conn, ex, self.res)

    def on_head(self, ex: "Exchange", status: int, up: "UpstreamConn") -> bool:
        """The response head arrived. True: it is being retried (the caller must not forward it)."""
        now = monotonic()
        failed = self._end(status, now)
        if not failed and (self.policy is None or status not in self.policy.statuses):
            return False
        d = self._decide(ex, status, now)
        if isinstance(d, retry.Retry):
            self._schedule(ex, d.after)
            return True
        if self.retries and failed:
            ex.flag = "URX"
        return False

    def on_failure(self, ex: "Exchange", server: "ServerConn", status: int, reason: str, flag: str) -> None:
        """The attempt failed before any response byte: retry, or answer with the error."""
        now = monotonic()
        self._end(None, now)
        d = self._decide(ex, None, now)
        if isinstance(d, retry.Retry) and not ex.done:
            self._schedule(ex, d.after)
            return
        server.respond_error(ex, status, reason, f"URX,{flag}" if self.retries else flag)

    def keep_body(self, ex: "Exchange", data: bytes) -> None:
        if self.policy is not None and ex.body_done and len(data) <= retry.MAX_BODY:
            self.body = data

    # --- the end of the logical request
    def finish(self, ex: "Exchange") -> None:
        if self.try_timer is not None:
            self._disarm()
        lb = self.lb
        if lb is not None:
            self.lb = None
            lb.cancel()
        if self.admitted:
            self.admitted = False
            self.svc.admission.request_done()
        t = ex.resp_at or perf_counter()
        status = ex.status
        window = ROUTES.both if self.first is not None and not self.retries else ROUTES.effective
        window.add(self.route_key, status >= 500 or not status, (t - ex.start) * 1000.0, t)


def policy_of(ex: "Exchange") -> tuple[retry.RetryPolicy | None, str]:
    route = ex.route
    if route is None:
        return (_settings or settings()).default_retry, DEFAULT_NAME
    if route.retry is None and route.rule == -1:
        return (_settings or settings()).default_retry, route.name
    return route.retry, route.name


def admit(out: Any, conn: "ServerConn", ex: "Exchange", res: Any) -> ReqState | breaker.Reject:
    svc: Service = res.svc
    verdict = svc.admission.request()
    if verdict is not breaker.ADMIT:
        return verdict  # type: ignore[return-value]
    svc.budget.deposit(monotonic())
    policy, name = policy_of(ex)
    return ReqState(out, conn, res, svc, policy, ROUTES.key(res.authority, name))


# === visibility ===

def describe(resolutions: Mapping[str, Any]) -> dict[str, Any]:
    now = monotonic()
    out = {}
    for auth, res in resolutions.items():
        eps = []
        for e in res.lb:
            b = e.breaker
            eps.append({"address": f"{e.key.addr[0]}:{e.key.addr[1]}", "state": state_of(e, now),
                        "breaker": b.state if b is not None else "off",
                        "ewma_ms": round(e.ewma.get(now) * 1000.0, 3), "pending": e.pending,
                        "consecutive_failures": b.failures if b is not None else 0,
                        "reopen_in_s": round(max(0.0, b.reopen_at - now), 3)
                        if b is not None and b.state == breaker.OPEN else None})
        adm = res.svc.admission
        out[auth] = {"endpoints": eps, "pending_requests": adm.pending, "connections": adm.connections,
                     "max_pending_requests": adm.limits.max_pending_requests,
                     "max_connections": adm.limits.max_connections,
                     "retry_budget_balance": round(res.svc.budget.balance(now), 1)}
    return out


GAUGES = ("outbound_http_balancer_endpoints", "outbound_http_endpoint_breaker_open")


def refresh_gauges(metrics: Any, resolutions: Mapping[str, Any]) -> None:
    """Recompute the balancer gauges (called before a scrape)."""
    g = metrics.gauges
    for k in [k for k in g if k[0] in GAUGES]:
        del g[k]
    now = monotonic()
    for auth, res in resolutions.items():
        counts = {"ready": 0, "pending": 0, "open": 0}
        for e in res.lb:
            s = state_of(e, now)
            counts[s] += 1
            g[(GAUGES[1], labels(authority=auth, endpoint=f"{e.key.addr[0]}:{e.key.addr[1]}"))] = \
                1 if s == "open" else 0
        for s, n in counts.items():
            g[(GAUGES[0], labels(authority=auth, endpoint_state=s))] = n


def routes_doc(window: int, started: float) -> dict[str, Any]:
    now = perf_counter()
    return {"window": window, "elapsed": max(0.0, min(float(window), int(monotonic()) - started)),
            "routes": ROUTES.rows(window, now)}


RandomSource = Callable[[], float]
