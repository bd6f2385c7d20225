"""Route selection for one service: which rule a request matches, and where it goes.

Theory of operation
-------------------
``RouteTable(service, namespace, port, routes)`` keeps the HTTPRoutes attached to that
service (a ``parentRef`` naming it, with no port or this port) and compiles them once:

- every rule becomes one immutable ``Route`` decision: the route name for metrics, the
  backends with their weights (a rule without ``backendRefs`` sends to the service itself),
  timeouts, retry policy (the rule's ``retry``, else the route's ``retry.linkerd.io/*``
  annotations), mirrors, fault and header modifiers;
- every match of every rule becomes a ``matching.Matcher``; the matchers are sorted once by
  Gateway API precedence (``Matcher.rank``: exact path > longest prefix > regex; then
  method; then most headers; then most query parameters), then by the oldest route
  (``creationTimestamp``; routes without one count as newest), then ``namespace/name``,
  then rule order, then match order.

``select(method, path, query, headers)`` walks that list and returns the ``Route`` of the
first matcher that matches, or the ``[DEFAULT]`` route (straight to the service, no
timeouts, no retries) when none does or no HTTPRoute is attached. Per request nothing is
allocated, except the query string's dict when some matcher needs query parameters.

``choose_backend(route, r)`` picks a backend with probability weight / total weight from a
random float ``r`` in [0, 1) (a binary search over cumulative weights); when every weight is
0 it returns None and the caller answers 500, as the Gateway API asks.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from .fault import Fault
from .httproute import (NO_TIMEOUTS, BackendRef, HeaderModifier, HTTPRoute, Mirror, Timeouts,
                        parse_httproute)
from .matching import Headers, Matcher, parse_query
from .retry import RetryPolicy

DEFAULT_NAME = "[DEFAULT]"


@dataclass(frozen=True, slots=True)
class Route:
    name: str                          # the HTTPRoute's name, or "[DEFAULT]"
    namespace: str
    rule: int                          # index of the rule in its HTTPRoute; -1 for [DEFAULT]
    backends: tuple[BackendRef, ...]
    cumulative: tuple[int, ...]        # running sums of the weights, for choose_backend
    timeouts: Timeouts = NO_TIMEOUTS
    retry: RetryPolicy | None = None
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None


def _route(http: HTTPRoute, index: int, service: BackendRef) -> Route:
    rule = http.rules[index]
    backends = rule.backends or (service,)
    return Route(http.name, http.namespace, index, backends,
                 tuple(accumulate(b.weight for b in backends)), rule.timeouts,
                 rule.retry if rule.retry is not None else http.retry, rule.mirrors, http.fault,
                 rule.request_headers, rule.response_headers)


def _age(http: HTTPRoute) -> tuple[bool, str, str]:
    return (http.created is None, http.created or "", f"{http.namespace}/{http.name}")


class RouteTable:
    __slots__ = ("service", "namespace", "port", "routes", "default", "_matchers", "_needs_query")

    def __init__(self, service: str, namespace: str, port: int, routes: Iterable[HTTPRoute] = ()) -> None:
        self.service, self.namespace, self.port = service, namespace, port
        self.routes = tuple(sorted((r for r in routes if r.attaches_to(service, namespace, port)), key=_age))
        itself = BackendRef(service, namespace, port)
        self.default = Route(DEFAULT_NAME, namespace, -1, (itself,), (1,))
        ranked: list[tuple[tuple[int, ...], int, Matcher, Route]] = []
        for http in self.routes:
            for index, rule in enumerate(http.rules):
                route = _route(http, index, itself)
                for match in rule.matches:
                    matcher = Matcher(match)
                    ranked.append((tuple(-x for x in matcher.rank), len(ranked), matcher, route))
        ranked.sort(key=lambda item: item[:2])   # ties: routes by age, rules and matches in list order
        self._matchers = tuple((m, r) for _, _, m, r in ranked)
        self._needs_query = any(m.query for m, _ in self._matchers)

    def select(self, method: bytes, path: bytes, query: bytes, headers: Headers) -> Route:
        """``path`` without the query; ``query`` without the ``?``; header names lower-case."""
        params = parse_query(query) if self._needs_query and query else None
        for matcher, route in self._matchers:
            if matcher.matches(method, path, headers, params):
                return route
        return self.default

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "namespace": self.namespace, "port": self.port,
                "routes": [r.to_json() for r in self.routes]}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RouteTable:
        """Raises ``ValueError`` (``FieldError`` for a bad route) on malformed input."""
        try:
            service, namespace, port, routes = obj["service"], obj["namespace"], obj["port"], obj["routes"]
        except (KeyError, TypeError):
            raise ValueError("route table: needs service, namespace, port and routes") from None
        return cls(service, namespace, port, [parse_httproute(r) for r in routes])


def choose_backend(route: Route, r: float) -> BackendRef | None:
    """Weighted choice with the random float ``r`` in [0, 1); None when all weights are 0."""
    total = route.cumulative[-1]
    if total <= 0:
        return None
    i = bisect_right(route.cumulative, r * total)
    return route.backends[min(i, len(route.backends) - 1)]   # r * total may round up to total


def should_mirror(mirror: Mirror, r: float) -> bool:
    return r * 100.0 < mirror.percent


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """An origin-form request target -> (path, query)."""
    path, _, query = target.partition(b"?")
    return path, query


def modify_headers(mod: HeaderModifier, headers: Headers) -> Headers:
    """A new header list: ``remove``, then ``set`` (replaces all values), then ``add`` (appends)."""
    drop = {n.encode() for n in mod.remove} | {n.encode() for n, _ in mod.set}
    out = [h for h in headers if h[0] not in drop]   # (h2's never-indexed tuples stay so)
    out += [(n.encode(), v.encode()) for n, v in mod.set]
    out += [(n.encode(), v.encode()) for n, v in mod.add]
    return out
