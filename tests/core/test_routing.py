"""Route selection and weighted backends (microproxy/core/routing.py, matching.py)."""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from microproxy.core.httproute import BackendRef, HeaderModifier, HTTPRoute, Mirror, parse_httproute
from microproxy.core.matching import Match, Matcher, PathMatch, ValueMatch, parse_query
from microproxy.core.retry import RetryPolicy
from microproxy.core.routing import (DEFAULT_NAME, RouteTable, choose_backend, modify_headers,
                                     should_mirror, split_target)
from tests.core.test_httproute import SEED

NS = "shop"


def route(name: str, rules: list[dict[str, Any]], created: str | None = None, service: str = "web",
          port: int | None = 80, annotations: dict[str, str] | None = None) -> HTTPRoute:
    meta: dict[str, Any] = {"name": name, "namespace": NS, "annotations": annotations or {}}
    if created:
        meta["creationTimestamp"] = created
    parent: dict[str, Any] = {"group": "core", "kind": "Service", "name": service}
    if port is not None:
        parent["port"] = port
    return parse_httproute({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                            "metadata": meta, "spec": {"parentRefs": [parent], "rules": rules}})


def to(backend: str, **match: Any) -> dict[str, Any]:
    """A rule sending requests that match ``match`` to ``backend``."""
    return {"matches": [match], "backendRefs": [{"name": backend, "port": 80}]}


def hit(table: RouteTable, target: bytes = b"/", method: bytes = b"GET",
        headers: list[tuple[bytes, bytes]] | None = None) -> str:
    """The single backend name the request routes to."""
    path, query = split_target(target)
    r = table.select(method, path, query, headers or [])
    assert len(r.backends) == 1
    return r.backends[0].name


def name(backend: BackendRef | None) -> str | None:
    return backend.name if backend else None


def test_seed_header_routing_and_canary() -> None:
    table = RouteTable("web", NS, 8080, [parse_httproute(yaml.safe_load(SEED))])
    beta = table.select(b"GET", b"/shop", b"", [(b"x-user-group", b"beta")])
    assert [b.name for b in beta.backends] == ["web-v2"]
    assert beta.name == "web-split" and beta.rule == 0
    assert beta.retry == RetryPolicy(limit=2)
    for headers in ([], [(b"x-user-group", b"alpha")], [(b"x-user-groups", b"beta")]):
        r = table.select(b"GET", b"/shop", b"", headers)
        assert (r.rule, [b.name for b in r.backends]) == (1, ["web-v1", "web-v2"])
    canary = table.select(b"GET", b"/", b"", [])
    rng = random.Random(7)
    counts = Counter(name(choose_backend(canary, rng.random())) for _ in range(2000))
    assert abs(counts["web-v2"] - 200) <= 40, counts   # 10 %, within 3 sigma (sigma = 13.4)
    evenly = Counter(name(choose_backend(canary, (i + 0.5) / 2000)) for i in range(2000))
    assert evenly == {"web-v1": 1800, "web-v2": 200}


# (description, rules of route "a", request target, method, headers, expected backend)
PRECEDENCE = [
    ("exact beats prefix", [to("p", path={"value": "/api"}), to("e", path={"type": "Exact", "value": "/api"})],
     b"/api", b"GET", [], "e"),
    ("longest prefix wins", [to("short", path={"value": "/api"}), to("long", path={"value": "/api/v1"})],
     b"/api/v1/x", b"GET", [], "long"),
    ("prefix beats regex", [to("re", path={"type": "RegularExpression", "value": "/api/.*"}),
                            to("p", path={"value": "/api"})], b"/api/x", b"GET", [], "p"),
    ("longer regex first", [to("short", path={"type": "RegularExpression", "value": "/.*"}),
                            to("long", path={"type": "RegularExpression", "value": "/api/.*"})],
     b"/api/x", b"GET", [], "long"),
    ("method beats headers", [to("h", headers=[{"name": "x", "value": "1"}]), to("m", method="GET")],
     b"/", b"GET", [(b"x", b"1")], "m"),
    ("more headers win", [to("one", headers=[{"name": "a", "value": "1"}]),
                          to("two", headers=[{"name": "a", "value": "1"}, {"name": "b", "value": "2"}])],
     b"/", b"GET", [(b"a", b"1"), (b"b", b"2")], "two"),
    ("headers beat query", [to("q", queryParams=[{"name": "q", "value": "1"}]),
                            to("h", headers=[{"name": "a", "value": "1"}])],
     b"/?q=1", b"GET", [(b"a", b"1")], "h"),
    ("more query params win", [to("one", queryParams=[{"name": "a", "value": "1"}]),
                               to("two", queryParams=[{"name": "a", "value": "1"}, {"name": "b", "value": "2"}])],
     b"/?a=1&b=2", b"GET", [], "two"),
    ("first rule wins a tie", [to("first", path={"value": "/x"}), to("second", path={"value": "/x/"})],
     b"/x", b"GET", [], "first"),
    ("non-matching specific rule falls through", [to("m", method="POST"), to("any")],
     b"/", b"GET", [], "any"),
]


@pytest.mark.parametrize("rules,target,method,headers,expected", [c[1:] for c in PRECEDENCE],
                         ids=[c[0] for c in PRECEDENCE])
def test_precedence(rules: list[dict[str, Any]], target: bytes, method: bytes,
                    headers: list[tuple[bytes, bytes]], expected: str) -> None:
    assert hit(RouteTable("web", NS, 80, [route("a", rules)]), target, method, headers) == expected
    # the order rules are written in does not matter unless they tie
    if not expected.startswith("first"):
        assert hit(RouteTable("web", NS, 80, [route("a", rules[::-1])]), target, method, headers) == expected


def test_ties_across_routes_go_to_the_oldest_then_by_name() -> None:
    old = route("zz-old", [to("old")], created="2024-01-01T00:00:00Z")
    new = route("aa-new", [to("new")], created="2024-06-01T00:00:00Z")
    b_undated, a_undated = route("b", [to("b")]), route("a", [to("a")])
    assert hit(RouteTable("web", NS, 80, [new, b_undated, old, a_undated])) == "old"
    assert hit(RouteTable("web", NS, 80, [b_undated, new])) == "new"    # undated counts as newest
    assert hit(RouteTable("web", NS, 80, [b_undated, a_undated])) == "a"
    # precedence still comes before age
    specific = route("young", [to("young", path={"type": "Exact", "value": "/"})], created="2025-01-01T00:00:00Z")
    assert hit(RouteTable("web", NS, 80, [old, specific])) == "young"


# (match, target, headers, matches?)
MATCHES = [
    ({"path": {"value": "/foo"}}, b"/foo", [], True),
    ({"path": {"value": "/foo"}}, b"/foo/", [], True),
    ({"path": {"value": "/foo"}}, b"/foo/bar", [], True),
    ({"path": {"value": "/foo"}}, b"/foobar", [], False),
    ({"path": {"value": "/foo"}}, b"/fo", [], False),
    ({"path": {"value": "/foo/"}}, b"/foo", [], True),
    ({"path": {"value": "/"}}, b"/anything", [], True),
    ({"path": {"value": "/"}}, b"*", [], True),
    ({"path": {"type": "Exact", "value": "/foo"}}, b"/foo?x=1", [], True),
    ({"path": {"type": "Exact", "value": "/foo"}}, b"/foo/", [], False),
    ({"path": {"type": "RegularExpression", "value": "/u/[0-9]+"}}, b"/u/42", [], True),
    ({"path": {"type": "RegularExpression", "value": "/u/[0-9]+"}}, b"/u/42/x", [], False),   # whole path
    ({"method": "POST"}, b"/", [], False),
    ({"headers": [{"name": "X-Env", "value": "prod"}]}, b"/", [(b"x-env", b"prod")], True),
    ({"headers": [{"name": "x-env", "value": "prod"}]}, b"/", [(b"x-env", b"Prod")], False),
    ({"headers": [{"name": "x-env", "value": "prod"}]}, b"/", [(b"x-env", b"dev"), (b"x-env", b"prod")], True),
    ({"headers": [{"name": "x-env", "value": "prod"}]}, b"/", [(b"x-other", b"prod")], False),
    ({"headers": [{"type": "RegularExpression", "name": "x-v", "value": "v[12]"}]}, b"/", [(b"x-v", b"v2")], True),
    ({"headers": [{"type": "RegularExpression", "name": "x-v", "value": "v[12]"}]}, b"/", [(b"x-v", b"v22")],
     False),
    ({"queryParams": [{"name": "q", "value": "a b"}]}, b"/?q=a%20b", [], True),
    ({"queryParams": [{"name": "q", "value": "1"}]}, b"/?q=1&q=2", [], True),
    ({"queryParams": [{"name": "q", "value": "2"}]}, b"/?q=1&q=2", [], False),    # first occurrence
    ({"queryParams": [{"name": "q", "value": "1"}]}, b"/?Q=1", [], False),        # names are case-sensitive
    ({"queryParams": [{"name": "q", "value": "1"}]}, b"/", [], False),
    ({"queryParams": [{"type": "RegularExpression", "name": "id", "value": "[0-9]+"}]}, b"/?id=17&&x", [], True),
]


@pytest.mark.parametrize("match,target,headers,expected", MATCHES)
def test_match_semantics(match: dict[str, Any], target: bytes, headers: list[tuple[bytes, bytes]],
                         expected: bool) -> None:
    table = RouteTable("web", NS, 80, [route("a", [to("hit", **match)])])
    path, query = split_target(target)
    assert (table.select(b"GET", path, query, headers).name == "a") is expected


def test_query_matcher_without_params_fails_closed() -> None:
    m = Matcher(Match(PathMatch("PathPrefix", "/"), None, (), (ValueMatch("q", "Exact", "1"),)))
    assert not m.matches(b"GET", b"/", [], None)
    assert m.matches(b"GET", b"/", [], parse_query(b"q=1"))


def test_default_route() -> None:
    other_service = route("other", [to("x")], service="api")
    other_port = route("port", [to("x")], port=81)
    any_port = route("anyport", [to("any", method="PUT")], port=None)
    for table in (RouteTable("web", NS, 80), RouteTable("web", NS, 80, [other_service, other_port, any_port])):
        r = table.select(b"GET", b"/", b"", [])
        assert (r.name, r.rule, r.backends, r.retry, r.timeouts.request) == (
            DEFAULT_NAME, -1, (BackendRef("web", NS, 80),), None, None)
        assert choose_backend(r, 0.99) == BackendRef("web", NS, 80)
    assert [r.name for r in RouteTable("web", NS, 80, [other_service, other_port, any_port]).routes] == ["anyport"]
    assert RouteTable("web", "elsewhere", 80, [any_port]).routes == ()


def test_rule_details_reach_the_decision() -> None:
    mirror = {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}}
    response = {"type": "ResponseHeaderModifier",
                "responseHeaderModifier": {"set": [{"name": "x", "value": "1"}]}}
    http = route("r", [
        {"matches": [{"method": "GET"}], "retry": {"codes": [503]}, "filters": [mirror, response]},
        {"timeouts": {"request": "2s"}},
    ], annotations={"retry.linkerd.io/http": "gateway-error",
                    "fault.micromesh.io/http": '{"abort": {"httpStatus": 500}}'})
    table = RouteTable("web", NS, 80, [http])
    get, post = table.select(b"GET", b"/", b"", []), table.select(b"POST", b"/", b"", [])
    assert get.backends == post.backends == (BackendRef("web", NS, 80),)   # no backendRefs: the service
    assert get.retry == RetryPolicy(frozenset({503}), frozenset(), 1, 0.025, 0.25)   # the rule's wins
    assert post.retry is not None and post.retry.statuses == {502, 503, 504}
    assert get.mirrors == (Mirror(BackendRef("shadow", NS, 80), 100),)
    assert get.response_headers == HeaderModifier(set=(("x", "1"),)) and get.request_headers is None
    assert post.timeouts.request == 2.0 and get.timeouts.request is None
    assert get.fault is post.fault is not None


@pytest.mark.parametrize("weights,draws,expected", [
    ([0, 5], [0.0, 0.5, 0.999], ["b1", "b1", "b1"]),
    ([5, 0, 5], [0.0, 0.49, 0.5, 0.999], ["b0", "b0", "b2", "b2"]),
    ([1, 1, 2], [0.0, 0.25, 0.5, 0.75], ["b0", "b1", "b2", "b2"]),
    ([3], [0.0, 0.999999], ["b0", "b0"]),
    ([1_000_000, 1_000_000], [1 - 2**-53], ["b1"]),
    ([0, 0], [0.0, 0.5], [None, None]),
])
def test_weighted_choice(weights: list[int], draws: list[float], expected: list[str | None]) -> None:
    rule = {"backendRefs": [{"name": f"b{i}", "port": 80, "weight": w} for i, w in enumerate(weights)]}
    r = RouteTable("web", NS, 80, [route("w", [rule])]).select(b"GET", b"/", b"", [])
    assert [name(choose_backend(r, x)) for x in draws] == expected


def test_mirror_percent() -> None:
    half = Mirror(BackendRef("s", NS, 80), 50)
    assert [should_mirror(half, r) for r in (0.0, 0.49, 0.5, 0.99)] == [True, True, False, False]
    assert not should_mirror(Mirror(BackendRef("s", NS, 80), 0), 0.0)
    assert should_mirror(Mirror(BackendRef("s", NS, 80), 100), 0.999)


def test_modify_headers() -> None:
    mod = HeaderModifier(set=(("x-set", "new"),), add=(("x-add", "2"),), remove=("x-gone",))
    headers = [(b"x-set", b"old"), (b"x-set", b"older"), (b"x-add", b"1"), (b"x-gone", b"1"), (b"host", b"h")]
    assert modify_headers(mod, headers) == [(b"x-add", b"1"), (b"host", b"h"),
                                            (b"x-set", b"new"), (b"x-add", b"2")]
    assert headers[0] == (b"x-set", b"old")   # the input is not modified


def test_split_target() -> None:
    assert split_target(b"/a/b?x=1&y") == (b"/a/b", b"x=1&y")
    assert split_target(b"/a") == (b"/a", b"")


def test_table_json_round_trip() -> None:
    table = RouteTable("web", NS, 8080, [parse_httproute(yaml.safe_load(SEED))])
    copy = RouteTable.from_json(table.to_json())
    assert copy.routes == table.routes and (copy.service, copy.namespace, copy.port) == ("web", NS, 8080)
    assert copy.select(b"GET", b"/", b"", [(b"x-user-group", b"beta")]) == \
        table.select(b"GET", b"/", b"", [(b"x-user-group", b"beta")])


@pytest.mark.parametrize("bad", [{}, [], None, {"service": "web", "namespace": NS, "port": 80}])
def test_table_from_bad_json(bad: Any) -> None:
    with pytest.raises(ValueError, match="^route table: needs"):
        RouteTable.from_json(bad)
