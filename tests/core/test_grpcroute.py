"""GRPCRoute -> the routing model (microproxy/core/grpcroute.py): method matches become path
matches on POST, the rest is HTTPRoute's; errors name GRPCRoute's fields."""
from __future__ import annotations

from typing import Any

import pytest

from microproxy.core.fields import FieldError
from microproxy.core.grpcroute import parse_grpcroute
from microproxy.core.routing import RouteTable


def grpcroute(rules: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"parentRefs": [{"group": "core", "kind": "Service", "name": "greeter", "port": 7000}],
                            **spec}
    if rules is not None:
        body["rules"] = rules
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "greeter-split", "namespace": "default"}, "spec": body}


def to(backend: str, **match: Any) -> dict[str, Any]:
    return {"matches": [match], "backendRefs": [{"name": backend, "port": 7000}]}


def hit(table: RouteTable, path: bytes, method: bytes = b"POST",
        headers: list[tuple[bytes, bytes]] | None = None) -> str:
    r = table.select(method, path, b"", headers or [])
    return r.backends[0].name if r.name != "[DEFAULT]" else "[DEFAULT]"


def table(rules: list[dict[str, Any]]) -> RouteTable:
    return RouteTable("greeter", "default", 7000, [parse_grpcroute(grpcroute(rules))])


def test_method_matches() -> None:
    t = table([to("exact", method={"service": "mesh.Greeter", "method": "Who"}),
               to("service", method={"service": "mesh.Greeter"}),
               to("method", method={"method": "Ping"}),
               to("regex", method={"type": "RegularExpression", "service": "mesh\\.G.*", "method": "S.*"}),
               {"backendRefs": [{"name": "rest", "port": 7000}]}])
    assert hit(t, b"/mesh.Greeter/Who") == "exact"
    assert hit(t, b"/mesh.Greeter/Count") == "service"
    assert hit(t, b"/mesh.Greeterx/Count") == "rest"        # PathPrefix is by whole segments
    assert hit(t, b"/other.Svc/Ping") == "method"
    assert hit(t, b"/mesh.Gadget/Sum") == "regex"
    assert hit(t, b"/other.Svc/Other") == "rest"
    assert hit(t, b"/mesh.Greeter/Who", method=b"GET") == "[DEFAULT]"   # gRPC is POST


def test_headers_filters_and_weights_are_httproutes() -> None:
    (route,) = parse_grpcroute(grpcroute([{
        "matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
        "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]}}],
        "backendRefs": [{"name": "v2", "port": 7000, "weight": 90}, {"name": "v1", "port": 7000, "weight": 10}]}])).rules
    assert [b.name for b in route.backends] == ["v2", "v1"] and route.request_headers is not None
    t = table([to("v2", headers=[{"name": "x-version", "value": "v2"}])])
    assert hit(t, b"/a.B/C", headers=[(b"x-version", b"v2")]) == "v2"
    assert hit(t, b"/a.B/C") == "[DEFAULT]"


def test_no_rules_or_matches_route_every_call() -> None:
    t = RouteTable("greeter", "default", 7000, [parse_grpcroute(grpcroute(None))])
    assert hit(t, b"/a.B/C") == "greeter"   # the parent itself, by the route
    assert t.select(b"POST", b"/a.B/C", b"", []).name == "greeter-split"


@pytest.mark.parametrize("rules,field", [
    ([to("x", method={})], "spec.rules[0].matches[0].method: must name a service, a method or both"),
    ([to("x", method={"service": "has space"})], "spec.rules[0].matches[0].method.service"),
    ([to("x", method={"method": "a/b"})], "spec.rules[0].matches[0].method.method"),
    ([to("x", method={"type": "Prefix", "method": "M"})], "spec.rules[0].matches[0].method.type"),
    ([to("x", method={"type": "RegularExpression", "method": "("})], "is not a regular expression"),
    ([to("x", path={"value": "/x"})], "spec.rules[0].matches[0].path: unknown field"),
    ([{**to("x"), "timeouts": {"request": "1s"}}], "spec.rules[0].timeouts: unknown field"),
    ([{"backendRefs": [{"name": "x"}]}], "spec.rules[0].backendRefs[0].port"),
])
def test_errors_name_the_field(rules: list[dict[str, Any]], field: str) -> None:
    with pytest.raises(FieldError) as e:
        parse_grpcroute(grpcroute(rules))
    assert field in str(e.value)


# --- found in review (each failed before its fix)

def test_a_regex_part_with_an_alternation_stays_in_its_part() -> None:
    t = table([to("rx", method={"type": "RegularExpression", "service": r"a\.B|c\.D", "method": "Get"})])
    assert hit(t, b"/a.B/Get") == hit(t, b"/c.D/Get") == "rx"
    assert hit(t, b"/c.D/Other") == "[DEFAULT]"


def test_a_case_insensitive_regex_part() -> None:
    t = table([to("x", method={"type": "RegularExpression", "service": r"(?i)mesh\.greeter"})])
    assert hit(t, b"/mesh.Greeter/Who") == "x" and hit(t, b"/other.Svc/Who") == "[DEFAULT]"


def test_long_regex_parts_are_refused_naming_the_method_match() -> None:
    with pytest.raises(FieldError) as e:
        parse_grpcroute(grpcroute([to("x", method={"type": "RegularExpression", "service": "a" * 600,
                                                    "method": "b" * 600})]))
    assert str(e.value).startswith("spec.rules[0].matches[0].method: ")


def test_a_grpcroute_with_null_rules_is_stored_and_listed() -> None:
    from cli.resources import route_rows
    from destination.resources import validate
    doc = grpcroute(None)
    doc["spec"]["rules"] = None   # YAML `rules:` left empty
    res = validate(doc)
    assert route_rows([{**res.body, "metadata": {**res.body["metadata"], "resourceVersion": 1}}])[0]["rules"] == 0


def test_grpcroutes_win_over_httproutes_on_the_same_service() -> None:
    """The two kinds are not merged (Gateway API): the service's GRPCRoutes are its routes."""
    from destination.resource_api import ResourceAPI
    from destination.resources import Store, validate
    from destination.server import WatchHub
    store = Store()
    api = ResourceAPI(store, WatchHub(), None, "cluster.local")
    http = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "all", "namespace": "default"},
            "spec": {"parentRefs": [{"group": "core", "kind": "Service", "name": "greeter", "port": 7000}],
                     "rules": [{"backendRefs": [{"name": "http-all", "port": 7000}]}]}}
    store.apply(validate(http))
    names = [r["metadata"]["name"] for r in api.profile_snapshot("greeter", "default", 7000)["routes"]["routes"]]
    assert names == ["all"]
    store.apply(validate(grpcroute([to("ping", method={"method": "Ping"})])))
    names = [r["metadata"]["name"] for r in api.profile_snapshot("greeter", "default", 7000)["routes"]["routes"]]
    assert names == ["greeter-split"]
