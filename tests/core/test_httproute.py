"""HTTPRoute parsing and validation (microproxy/core/httproute.py, matching.py, fields.py)."""
from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from microproxy.core.fault import Fault
from microproxy.core.fields import FieldError, duration, render_duration
from microproxy.core.httproute import (BackendRef, HeaderModifier, HTTPRoute, Mirror, ParentRef,
                                       Timeouts, parse_httproute)
from microproxy.core.matching import DEFAULT_MATCH, Match, PathMatch, ValueMatch
from microproxy.core.retry import ALL_5XX, RetryPolicy

SEED = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-split
  namespace: shop
  annotations:
    retry.linkerd.io/http: "5xx"
    retry.linkerd.io/limit: "2"
spec:
  parentRefs:
    - {group: core, kind: Service, name: web, port: 8080}
  rules:
    - matches:
        - headers: [{name: x-user-group, value: beta}]
      backendRefs: [{name: web-v2, port: 8080}]
    - backendRefs:
        - {name: web-v1, port: 8080, weight: 90}
        - {name: web-v2, port: 8080, weight: 10}
      timeouts: {request: 10s, backendRequest: 500ms}
"""


def doc(rule: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    """A minimal valid HTTPRoute for Service web:80, with one rule."""
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "r", **meta},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                     "rules": [rule if rule is not None else {}]}}


def test_seed_example_parses() -> None:
    r = parse_httproute(yaml.safe_load(SEED))
    assert (r.name, r.namespace) == ("web-split", "shop")
    assert r.parents == (ParentRef("web", "shop", 8080),)
    beta, rest = r.rules
    assert beta.matches == (Match(PathMatch("PathPrefix", "/"), None,
                                  (ValueMatch("x-user-group", "Exact", "beta"),)),)
    assert beta.backends == (BackendRef("web-v2", "shop", 8080, 1),)
    assert rest.matches == (DEFAULT_MATCH,)
    assert [b.weight for b in rest.backends] == [90, 10]
    assert rest.timeouts == Timeouts(10.0, 0.5)
    assert r.retry == RetryPolicy(ALL_5XX, frozenset(), 2)


# (description, rule, attribute of the parsed Rule, expected value)
RULES = [
    ("no matches: PathPrefix /", {}, "matches", (DEFAULT_MATCH,)),
    ("null matches", {"matches": None}, "matches", (DEFAULT_MATCH,)),
    ("exact path", {"matches": [{"path": {"type": "Exact", "value": "/a"}}]}, "matches",
     (Match(PathMatch("Exact", "/a")),)),
    ("regex path, method", {"matches": [{"path": {"type": "RegularExpression", "value": "/u/[0-9]+"},
                                         "method": "GET"}]},
     "matches", (Match(PathMatch("RegularExpression", "/u/[0-9]+"), "GET"),)),
    ("header names lower-cased, later duplicates ignored",
     {"matches": [{"headers": [{"name": "X-A", "value": "1"}, {"name": "x-a", "value": "2"},
                               {"type": "RegularExpression", "name": "x-b", "value": "b.*"}]}]},
     "matches", (Match(DEFAULT_MATCH.path, None, (ValueMatch("x-a", "Exact", "1"),
                                                  ValueMatch("x-b", "RegularExpression", "b.*"))),)),
    ("query names keep their case",
     {"matches": [{"queryParams": [{"name": "Q", "value": "1"}]}]},
     "matches", (Match(DEFAULT_MATCH.path, None, (), (ValueMatch("Q", "Exact", "1"),)),)),
    ("backend defaults", {"backendRefs": [{"name": "v1", "port": 80}]}, "backends",
     (BackendRef("v1", "default", 80, 1),)),
    ("backend explicit", {"backendRefs": [{"group": "core", "kind": "Service", "name": "v1",
                                           "namespace": "other", "port": 81, "weight": 0}]},
     "backends", (BackendRef("v1", "other", 81, 0),)),
    ("timeouts 0s disables", {"timeouts": {"request": "0s", "backendRequest": "2s"}}, "timeouts",
     Timeouts(None, 2.0)),
    ("timeouts request only", {"timeouts": {"request": "1m"}}, "timeouts", Timeouts(60.0, None)),
    ("retry experimental", {"retry": {"codes": [503, 504], "attempts": 3, "backoff": "100ms"}},
     "retry", RetryPolicy(frozenset({503, 504}), frozenset(), 3, 0.1, 1.0)),
    ("retry defaults", {"retry": {}}, "retry", RetryPolicy(frozenset(), frozenset(), 1)),
    ("mirror", {"filters": [{"type": "RequestMirror", "requestMirror": {
        "backendRef": {"name": "shadow", "port": 80}, "percent": 25}}]}, "mirrors",
     (Mirror(BackendRef("shadow", "default", 80), 25),)),
    ("request header modifier", {"filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "X-Set", "value": "1"}], "add": [{"name": "x-add", "value": "2"}],
        "remove": ["X-Gone", "x-gone"]}}]}, "request_headers",
     HeaderModifier((("x-set", "1"),), (("x-add", "2"),), ("x-gone",))),
    ("response header modifier", {"filters": [{"type": "ResponseHeaderModifier",
                                               "responseHeaderModifier": {}}]},
     "response_headers", HeaderModifier()),
    ("rule name", {"name": "beta-users"}, "name", "beta-users"),
]


@pytest.mark.parametrize("rule,attr,expected", [c[1:] for c in RULES], ids=[c[0] for c in RULES])
def test_rules(rule: dict[str, Any], attr: str, expected: Any) -> None:
    assert getattr(parse_httproute(doc(rule)).rules[0], attr) == expected


def test_route_level_fields() -> None:
    d = doc(namespace="shop", creationTimestamp="2024-05-01T10:00:00Z", labels={"a": "b"}, uid="x",
            annotations={"fault.micromesh.io/http": '{"abort": {"httpStatus": 503, "percentage": 5}}',
                         "retry.linkerd.io/timeout": "300ms", "other": 3})
    d["spec"]["hostnames"] = ["web.shop.svc.cluster.local", "*.example.com"]
    d["spec"]["parentRefs"].append({"group": "core", "kind": "Service", "name": "api", "namespace": "x"})
    d["status"] = {"parents": []}
    r = parse_httproute(d)
    assert r.created == "2024-05-01T10:00:00Z"
    assert r.fault == Fault(abort_status=503, abort_percent=5.0)
    assert r.retry == RetryPolicy(timeout=0.3)
    assert r.hostnames == ("web.shop.svc.cluster.local", "*.example.com")
    assert r.parents == (ParentRef("web", "shop", 80), ParentRef("api", "x", None))
    assert r.attaches_to("web", "shop", 80) and not r.attaches_to("web", "shop", 81)
    assert r.attaches_to("api", "x", 9999) and not r.attaches_to("api", "shop", 80)


def test_no_rules_means_one_catch_all_rule() -> None:
    d = doc()
    del d["spec"]["rules"]
    (rule,) = parse_httproute(d).rules
    assert rule.matches == (DEFAULT_MATCH,) and rule.backends == ()


@pytest.mark.parametrize("value,expected", [
    (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05Z"),
    (datetime(2024, 1, 2, 3, 4, 5), "2024-01-02T03:04:05Z"),
    (datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))), "2024-01-02T03:04:05Z"),
])
def test_yaml_datetimes_are_normalized(value: datetime, expected: str) -> None:
    assert parse_httproute(doc(creationTimestamp=value)).created == expected


def _set(d: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Set (or with value DELETE, remove) the field at a path like ``spec.rules.0.matches``."""
    keys = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    target: Any = d
    for key in keys[:-1]:
        target = target[key]
    if value is DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


DELETE = object()
R0 = "spec.rules.0"
# (field to set, value, expected error message prefix)
INVALID: list[tuple[str, Any, str]] = [
    ("apiVersion", "v1", "apiVersion: must be gateway.networking.k8s.io/v1"),
    ("kind", "Service", "kind: must be HTTPRoute"),
    ("extra", 1, "extra: unknown field"),
    ("metadata", None, "metadata: must be a mapping"),
    ("metadata.name", "Bad_Name", "metadata.name: must be a DNS-1123 subdomain"),
    ("metadata.namespace", "a.b", "metadata.namespace: must be a DNS-1123 label"),
    ("metadata.annotations", [], "metadata.annotations: must be a mapping"),
    ("metadata.creationTimestamp", "yesterday", "metadata.creationTimestamp: must be an RFC 3339"),
    ("spec", None, "spec: must be a mapping"),
    ("spec.backendRefs", [], "spec.backendRefs: unknown field"),
    ("spec.parentRefs", [], "spec.parentRefs: must name at least one Service"),
    ("spec.parentRefs", {}, "spec.parentRefs: must be a list"),
    ("spec.parentRefs", [{"kind": "Service", "name": "web"}] * 33, "spec.parentRefs: must have at most 32"),
    ("spec.parentRefs.0", "web", "spec.parentRefs[0]: must be a mapping"),
    ("spec.parentRefs.0.kind", DELETE, "spec.parentRefs[0].kind: must be Service"),
    ("spec.parentRefs.0.group", DELETE, 'spec.parentRefs[0].group: must be "core" or ""'),
    ("spec.parentRefs.0.group", "gateway.networking.k8s.io", "spec.parentRefs[0].group:"),
    ("spec.parentRefs.0.sectionName", "http", "spec.parentRefs[0].sectionName: unknown field"),
    ("spec.parentRefs.0.port", 0, "spec.parentRefs[0].port: must be an integer 1..65535"),
    ("spec.parentRefs.0.name", "", "spec.parentRefs[0].name: must be a DNS-1123 label"),
    ("spec.hostnames", ["UPPER"], "spec.hostnames[0]: must be a hostname"),
    ("spec.rules", [{}] * 17, "spec.rules: must have at most 16 entries"),
    (R0, [], "spec.rules[0]: must be a mapping"),
    (f"{R0}.sessionPersistence", {}, "spec.rules[0].sessionPersistence: unknown field"),
    (f"{R0}.name", "Not Valid", "spec.rules[0].name: must be a DNS-1123 subdomain"),
    (f"{R0}.matches", [{}] * 65, "spec.rules[0].matches: must have at most 64"),
    (f"{R0}.matches", [{"host": "x"}], "spec.rules[0].matches[0].host: unknown field"),
    (f"{R0}.matches", [{"method": "get"}], "spec.rules[0].matches[0].method: must be one of GET"),
    (f"{R0}.matches", [{"path": {"type": "Prefix"}}], "spec.rules[0].matches[0].path.type: must be Exact"),
    (f"{R0}.matches", [{"path": "/"}], "spec.rules[0].matches[0].path: must be a mapping"),
    (f"{R0}.matches", [{"path": {"value": "api"}}], "spec.rules[0].matches[0].path.value: must be an absolute"),
    (f"{R0}.matches", [{"path": {"value": "/a?b"}}], "spec.rules[0].matches[0].path.value: must be an absolute"),
    (f"{R0}.matches", [{"path": {"value": "/a//b"}}], "spec.rules[0].matches[0].path.value: must not contain //"),
    (f"{R0}.matches", [{"path": {"value": "/a/.."}}], "spec.rules[0].matches[0].path.value: must not contain"),
    (f"{R0}.matches", [{"path": {"value": "/a%2Fb"}}], "spec.rules[0].matches[0].path.value: must not contain"),
    (f"{R0}.matches", [{"path": {"type": "RegularExpression", "value": "(["}}],
     "spec.rules[0].matches[0].path.value: is not a valid regular expression"),
    (f"{R0}.matches", [{"path": {"type": "RegularExpression", "value": 7}}],
     "spec.rules[0].matches[0].path.value: must be a non-empty string"),
    (f"{R0}.matches", [{"headers": [{"name": "x", "value": "1", "op": "eq"}]}],
     "spec.rules[0].matches[0].headers[0].op: unknown field"),
    (f"{R0}.matches", [{"headers": [{"type": "Prefix", "name": "x", "value": "1"}]}],
     "spec.rules[0].matches[0].headers[0].type: must be Exact or RegularExpression"),
    (f"{R0}.matches", [{"headers": [{"name": "bad name", "value": "1"}]}],
     "spec.rules[0].matches[0].headers[0].name: must be a header or parameter name"),
    (f"{R0}.matches", [{"headers": [{"name": "x", "value": "a\nb"}]}],
     "spec.rules[0].matches[0].headers[0].value: must be a value without control characters"),
    (f"{R0}.matches", [{"headers": [{"name": "x", "value": "1"}] * 17}],
     "spec.rules[0].matches[0].headers: must have at most 16"),
    (f"{R0}.matches", [{"queryParams": [{"type": "RegularExpression", "name": "q", "value": "*"}]}],
     "spec.rules[0].matches[0].queryParams[0].value: is not a valid regular expression"),
    (f"{R0}.matches", [{"queryParams": [{"name": "q", "value": "x" * 1025}]}],
     "spec.rules[0].matches[0].queryParams[0].value: must be a value"),
    (f"{R0}.backendRefs", [{"name": "v1"}], "spec.rules[0].backendRefs[0].port: is required"),
    (f"{R0}.backendRefs", [{"name": "v1", "port": 80}, {"name": "v2", "port": 80, "weight": -1}],
     "spec.rules[0].backendRefs[1].weight: must be an integer 0..1000000"),
    (f"{R0}.backendRefs", [{"name": "v1", "port": 80, "weight": 1_000_001}],
     "spec.rules[0].backendRefs[0].weight: must be an integer 0..1000000"),
    (f"{R0}.backendRefs", [{"name": "v1", "port": 80, "weight": True}],
     "spec.rules[0].backendRefs[0].weight: must be an integer"),
    (f"{R0}.backendRefs", [{"name": "v1", "port": 80, "weight": "5"}],
     "spec.rules[0].backendRefs[0].weight: must be an integer"),
    (f"{R0}.backendRefs", [{"kind": "ServiceImport", "name": "v1", "port": 80}],
     "spec.rules[0].backendRefs[0].kind: must be Service"),
    (f"{R0}.backendRefs", [{"group": "x.io", "name": "v1", "port": 80}],
     "spec.rules[0].backendRefs[0].group:"),
    (f"{R0}.backendRefs", [{"name": "v1", "port": 80, "filters": []}],
     "spec.rules[0].backendRefs[0].filters: unknown field"),
    (f"{R0}.backendRefs", [{"name": "v1", "port": 65536}], "spec.rules[0].backendRefs[0].port: must be"),
    (f"{R0}.filters", [{"type": "URLRewrite", "urlRewrite": {}}],
     "spec.rules[0].filters[0].type: must be one of RequestHeaderModifier"),
    (f"{R0}.filters", [{"type": ["x"]}], "spec.rules[0].filters[0].type: must be one of"),
    (f"{R0}.filters", ["x"], "spec.rules[0].filters[0]: must be a mapping"),
    (f"{R0}.filters", [{"type": "RequestMirror"}], "spec.rules[0].filters[0].requestMirror: is required"),
    (f"{R0}.filters", [{"type": "RequestMirror", "requestHeaderModifier": {}}],
     "spec.rules[0].filters[0].requestHeaderModifier: unknown field"),
    (f"{R0}.filters", [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 1},
                                                                   "fraction": {"numerator": 1}}}],
     "spec.rules[0].filters[0].requestMirror.fraction: unknown field"),
    (f"{R0}.filters", [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 1,
                                                                                  "weight": 1}}}],
     "spec.rules[0].filters[0].requestMirror.backendRef.weight: unknown field"),
    (f"{R0}.filters", [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "s", "port": 1},
                                                                   "percent": 101}}],
     "spec.rules[0].filters[0].requestMirror.percent: must be an integer 0..100"),
    (f"{R0}.filters", [{"type": "RequestHeaderModifier", "requestHeaderModifier": {}}] * 2,
     "spec.rules[0].filters[1].type: RequestHeaderModifier may appear only once"),
    (f"{R0}.filters", [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"replace": []}}],
     "spec.rules[0].filters[0].requestHeaderModifier.replace: unknown field"),
    (f"{R0}.filters", [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "set": [{"name": "a", "value": "1"}, {"name": "A", "value": "2"}]}}],
     "spec.rules[0].filters[0].requestHeaderModifier.set[1].name: header 'a' is listed twice"),
    (f"{R0}.filters", [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
        "add": [{"name": "a", "value": ""}]}}],
     "spec.rules[0].filters[0].requestHeaderModifier.add[0].value: must be a header value"),
    (f"{R0}.filters", [{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": [1]}}],
     "spec.rules[0].filters[0].responseHeaderModifier.remove[0]: must be an HTTP header name"),
    (f"{R0}.timeouts", {"request": "10"}, 'spec.rules[0].timeouts.request: must be a duration like "10s"'),
    (f"{R0}.timeouts", {"request": "1.5s"}, "spec.rules[0].timeouts.request: must be a duration"),
    (f"{R0}.timeouts", {"idle": "1s"}, "spec.rules[0].timeouts.idle: unknown field"),
    (f"{R0}.timeouts", {"request": "1s", "backendRequest": "2s"},
     "spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request"),
    (f"{R0}.retry", {"codes": [200]}, "spec.rules[0].retry.codes[0]: must be an integer 400..599"),
    (f"{R0}.retry", {"attempts": -1}, "spec.rules[0].retry.attempts: must be an integer 0..100"),
    (f"{R0}.retry", {"backoff": 5}, "spec.rules[0].retry.backoff: must be a duration"),
    (f"{R0}.retry", {"perTryTimeout": "1s"}, "spec.rules[0].retry.perTryTimeout: unknown field"),
    ("metadata.annotations", {"retry.linkerd.io/limit": 3},
     'metadata.annotations["retry.linkerd.io/limit"]: must be a string (quote it in YAML)'),
    ("metadata.annotations", {"retry.linkerd.io/http": "5xx,600"},
     "metadata.annotations[\"retry.linkerd.io/http\"]: '600' is not a status"),
    ("metadata.annotations", {"fault.micromesh.io/http": "{"},
     'metadata.annotations["fault.micromesh.io/http"]: must be a JSON object'),
]


@pytest.mark.parametrize("field,value,message", INVALID, ids=[f"{c[0]}={c[1]!r}"[:60] for c in INVALID])
def test_invalid(field: str, value: Any, message: str) -> None:
    with pytest.raises(FieldError) as e:
        parse_httproute(_set(doc(), field, value))
    assert str(e.value).startswith(message), str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("value", [None, [], "x"])
def test_not_a_mapping(value: Any) -> None:
    with pytest.raises(FieldError, match="^HTTPRoute: must be a mapping"):
        parse_httproute(value)


ROUND_TRIP = [doc(c[1]) for c in RULES] + [  # type: ignore[arg-type]
    yaml.safe_load(SEED),
    doc(creationTimestamp="2024-05-01T10:00:00Z", annotations={
        "retry.linkerd.io/grpc": "unavailable, internal", "retry.linkerd.io/timeout": "1m30s500ms",
        "fault.micromesh.io/http": '{"delay": {"fixedDelay": "2s", "percentage": {"value": 12.5}}}'}),
    _set(_set(doc(), "spec.hostnames", ["a.b"]), "spec.parentRefs.0.port", DELETE),
]


@pytest.mark.parametrize("d", ROUND_TRIP)
def test_json_round_trip(d: dict[str, Any]) -> None:
    route = parse_httproute(copy.deepcopy(d))
    shipped = json.loads(json.dumps(route.to_json()))
    assert HTTPRoute.from_json(shipped) == route
    assert parse_httproute(shipped).to_json() == shipped   # canonical form is a fixed point


@pytest.mark.parametrize("text,seconds,canonical", [
    ("10s", 10.0, "10s"), ("500ms", 0.5, "500ms"), ("1m", 60.0, "1m"), ("1h30m", 5400.0, "1h30m"),
    ("90s", 90.0, "1m30s"), ("1s500ms", 1.5, "1s500ms"), ("0s", 0.0, "0s"), ("99999ms", 99.999, "1m39s999ms"),
])
def test_durations(text: str, seconds: float, canonical: str) -> None:
    assert duration(text, "t") == seconds
    assert render_duration(seconds) == canonical
    assert duration(canonical, "t") == seconds


@pytest.mark.parametrize("text", ["", "10", "1.5s", "-1s", "100000s", "1d", "1s1s1s1s1s", 10, None])
def test_bad_durations(text: Any) -> None:
    with pytest.raises(FieldError, match="^t: must be a duration"):
        duration(text, "t")
