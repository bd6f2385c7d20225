"""Resource validation, the store, and destination's resource API (no sockets: handlers are
called with ``Request`` objects)."""
from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from destination.resource_api import ResourceAPI, load_store
from destination.resources import ResourceError, Store, kind_named, validate
from destination.server import WatchHub
from microproxy.ctlhttp import Request, Response, Stream
from microproxy.policy import compile_policies

CLI = "mesh-cli.micromesh.serviceaccount.identity.cluster.local"
PROXY = "billing.default.serviceaccount.identity.cluster.local"


def ap(spec: Any = None, name: str = "billing-from-payment", namespace: str | None = "default",
       **top: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    obj = {"apiVersion": "policy.micromesh.io/v1alpha1", "kind": "AuthorizationPolicy",
           "metadata": meta,
           "spec": spec if spec is not None else {
               "targetRef": {"kind": "Workload", "name": "billing"},
               "action": "ALLOW",
               "rules": [{"from": {"serviceAccounts": ["payment"]},
                          "to": {"methods": ["get", "POST"], "paths": ["/charge*"]}}]}}
    obj.update(top)
    return obj


# --- validation

def test_valid_policy_is_normalized() -> None:
    res = validate(ap())
    assert res.key == ("AuthorizationPolicy", "default", "billing-from-payment")
    assert res.ref == "authorizationpolicy/billing-from-payment"
    spec = res.body["spec"]
    assert spec["targetRef"] == {"kind": "Workload", "name": "billing", "port": None}
    assert spec["rules"] == [{"from": {"serviceAccounts": ["default/payment"], "unauthenticated": False},
                              "to": {"methods": ["GET", "POST"], "paths": ["/charge*"]}}]


def test_defaults() -> None:
    res = validate(ap({}, namespace=None))
    assert res.namespace == "default"
    assert res.body["spec"] == {"targetRef": None, "action": "ALLOW", "rules": []}
    res = validate(ap(None, name="x") | {"spec": None})
    assert res.body["spec"]["action"] == "ALLOW"


def test_full_shape_validates() -> None:
    validate(ap({"targetRef": {"kind": "Workload", "name": "web", "port": 8080}, "action": "AUDIT",
                 "rules": [{"from": {"serviceAccounts": ["prod/web"],
                                     "identities": ["*.prod.serviceaccount.identity.cluster.local", "*", "web.*"],
                                     "namespaces": ["prod"], "unauthenticated": True},
                            "to": {"methods": ["GET"], "paths": ["/exact", "/prefix*", "*"], "ports": [8080]}},
                           {}]},
                metadata={"name": "a.b", "namespace": "prod", "labels": {"app": "x"},
                          "resourceVersion": 7, "uid": "ignored"}))


BAD = [
    ("action", {"action": "PERMIT"}, "spec.action: must be ALLOW, DENY or AUDIT"),
    ("unknown spec field", {"acton": "DENY"}, "spec.acton: unknown field"),
    ("targetRef kind", {"targetRef": {"kind": "Service", "name": "x"}}, "spec.targetRef.kind: must be Workload"),
    ("targetRef name", {"targetRef": {"name": "Bad_Name"}}, "spec.targetRef.name:"),
    ("targetRef port", {"targetRef": {"name": "x", "port": 70000}}, "spec.targetRef.port: must be a port"),
    ("rules not list", {"rules": {"from": {}}}, "spec.rules: must be a list"),
    ("rule unknown field", {"rules": [{"form": {}}]}, "spec.rules[0].form: unknown field"),
    ("empty from", {"rules": [{"from": {}}]}, "spec.rules[0].from: must list at least one"),
    ("unauthenticated false only", {"rules": [{"from": {"unauthenticated": False}}]}, "spec.rules[0].from: must list"),
    ("unauthenticated not bool", {"rules": [{"from": {"unauthenticated": "yes"}}]}, "spec.rules[0].from.unauthenticated: must be true or false"),
    ("empty to", {"rules": [{"to": {}}]}, "spec.rules[0].to: must list at least one"),
    ("empty list", {"rules": [{"to": {"methods": []}}]}, "spec.rules[0].to.methods: must not be empty"),
    ("sa", {"rules": [{"from": {"serviceAccounts": ["a/b/c"]}}]}, "spec.rules[0].from.serviceAccounts[0]:"),
    ("sa type", {"rules": [{"from": {"serviceAccounts": [3]}}]}, "spec.rules[0].from.serviceAccounts[0]: must be a non-empty string"),
    ("identity star in middle", {"rules": [{"from": {"identities": ["a.*.b"]}}]}, "spec.rules[0].from.identities[0]:"),
    ("identity double star", {"rules": [{"from": {"identities": ["**"]}}]}, "spec.rules[0].from.identities[0]:"),
    ("namespace", {"rules": [{"from": {"namespaces": ["Prod"]}}]}, "spec.rules[0].from.namespaces[0]:"),
    ("method", {"rules": [{"to": {"methods": ["GE T"]}}]}, "spec.rules[0].to.methods[0]:"),
    ("path relative", {"rules": [{"to": {"paths": ["metrics"]}}]}, "spec.rules[0].to.paths[0]:"),
    ("path star middle", {"rules": [{"to": {"paths": ["/a*/b"]}}]}, "spec.rules[0].to.paths[0]:"),
    ("path query", {"rules": [{"to": {"paths": ["/a?b=1"]}}]}, "spec.rules[0].to.paths[0]:"),
    ("ports", {"rules": [{"to": {"ports": [0]}}]}, "spec.rules[0].to.ports[0]: must be a port"),
    ("ports bool", {"rules": [{"to": {"ports": [True]}}]}, "spec.rules[0].to.ports[0]: must be a port"),
    ("second rule", {"rules": [{}, {"to": {"paths": ["x"]}}]}, "spec.rules[1].to.paths[0]:"),
]


@pytest.mark.parametrize("what,spec,message", BAD, ids=[b[0] for b in BAD])
def test_invalid_spec_names_the_field(what: str, spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ResourceError) as e:
        validate(ap(spec))
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("obj,message", [
    ("text", "resource: must be a mapping"),
    ({"kind": "AuthorizationPolicy", "metadata": {"name": "x"}}, "apiVersion: must be policy.micromesh.io/v1alpha1"),
    ({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}, "kind: unknown kind 'Pod'"),
    ({"apiVersion": "policy.micromesh.io/v1alpha1", "metadata": {"name": "x"}}, "kind: missing"),
    (ap() | {"metadata": {}}, "metadata.name: missing"),
    (ap() | {"metadata": {"name": "Bad Name"}}, "metadata.name:"),
    (ap() | {"metadata": {"name": "x", "namespace": "NS"}}, "metadata.namespace:"),
    (ap() | {"metadata": {"name": "x", "labels": {"a": 1}}}, "metadata.labels: must map strings"),
    (ap() | {"extra": 1}, "extra: unknown field"),
])
def test_invalid_resource(obj: Any, message: str) -> None:
    with pytest.raises(ResourceError) as e:
        validate(obj)
    assert str(e.value).startswith(message), str(e.value)


def test_kind_names() -> None:
    for name in ("AuthorizationPolicy", "authorizationpolicies", "policies", "policy", "ap"):
        assert kind_named(name).name == "AuthorizationPolicy"
    with pytest.raises(ResourceError):
        kind_named("pods")


def test_normalized_policies_compile() -> None:
    st = Store()
    st.apply(validate(ap()))
    c = compile_policies(st.policies_for("billing", "default"), port=1)
    pay = "payment.default.serviceaccount.identity.cluster.local"
    assert c.decide(pay, b"GET", b"/charge/1").allowed
    assert not c.decide(pay, b"DELETE", b"/charge/1").allowed


# --- store

def test_store_apply_versions_and_results() -> None:
    st = Store()
    a = st.apply(validate(ap()))
    assert (a.result, a.changed, st.version) == ("created", frozenset({"policy:default"}), 1)
    assert a.resource["metadata"]["resourceVersion"] == 1
    b = st.apply(validate(ap()))
    assert (b.result, b.changed, st.version) == ("unchanged", frozenset(), 1)
    c = st.apply(validate(ap({"action": "DENY"})))
    assert (c.result, st.version) == ("configured", 2)
    assert c.resource["metadata"]["resourceVersion"] == 2
    st.apply(validate(ap(name="other", namespace="prod")))
    assert len(st.list()) == 2 and len(st.list(namespace="prod")) == 1
    assert st.delete("AuthorizationPolicy", "prod", "other") == frozenset({"policy:prod"})
    assert st.version == 4
    with pytest.raises(ResourceError) as e:
        st.delete("AuthorizationPolicy", "prod", "other")
    assert e.value.status == 404


def test_policies_for_targets() -> None:
    st = Store()
    st.apply(validate(ap(name="billing-only")))
    st.apply(validate(ap({"action": "DENY", "rules": [{}]}, name="whole-ns")))
    st.apply(validate(ap({"targetRef": {"name": "billing", "port": 9000}}, name="port-9000")))
    st.apply(validate(ap({"targetRef": {"name": "web"}}, name="web-only")))
    st.apply(validate(ap({}, name="other-ns", namespace="prod")))
    names = [p["name"] for p in st.policies_for("billing", "default")]
    assert names == ["billing-only", "port-9000", "whole-ns"]
    assert [p["name"] for p in st.policies_for("billing", "default", 8000)] == ["billing-only", "whole-ns"]
    assert [p["name"] for p in st.policies_for("web", "default")] == ["web-only", "whole-ns"]
    assert [p["name"] for p in st.policies_for("billing", "prod")] == ["other-ns"]


def test_store_roundtrip() -> None:
    st = Store()
    st.apply(validate(ap()))
    st.apply(validate(ap(name="b")))
    st.delete("AuthorizationPolicy", "default", "b")
    data = json.loads(json.dumps(st.to_dict()))
    again = Store.from_dict(data)
    assert again.version == 3 and again.list() == st.list()
    assert again.apply(validate(ap())).result == "unchanged"
    assert again.apply(validate(ap(name="c"))).resource["metadata"]["resourceVersion"] == 4
    with pytest.raises(ValueError):
        Store.from_dict({"format": 99})
    bad = copy.deepcopy(data)
    bad["resources"][0]["spec"]["action"] = "NOPE"
    with pytest.raises(ValueError):
        Store.from_dict(bad)


# --- the API, handlers called directly

def req(method: str, path: str, body: Any = None, ident: str | None = CLI,
        **query: str) -> Request:
    raw = b"" if body is None else json.dumps(body).encode()
    return Request(method, path, query, {}, raw, ident, None)


def call(api: ResourceAPI, r: Request) -> tuple[int, Any]:
    resp = asyncio.run(api.handle(r))
    assert isinstance(resp, Response)
    return resp.status, json.loads(resp.body)


def test_api_write_requires_the_cli_identity(tmp_path: Path) -> None:
    api = ResourceAPI(Store(), WatchHub(), tmp_path / "r.json", "cluster.local")
    status, body = call(api, req("POST", "/v1/resources", ap(), ident=PROXY))
    assert status == 403 and "may not change resources" in body["error"]
    status, _ = call(api, req("DELETE", "/v1/resources/policies/default/x", ident=None))
    assert status == 403
    assert call(api, req("POST", "/v1/resources", ap()))[0] == 201
    assert call(api, req("POST", "/v1/resources", ap()))[1]["result"] == "unchanged"
    status, body = call(api, req("POST", "/v1/resources", ap({"action": "NO"})))
    assert (status, body["error"]) == (400, "spec.action: must be ALLOW, DENY or AUDIT")
    # reads are open to any mesh identity
    status, body = call(api, req("GET", "/v1/resources", ident=PROXY, kind="policies"))
    assert status == 200 and [i["metadata"]["name"] for i in body["items"]] == ["billing-from-payment"]
    status, body = call(api, req("GET", "/v1/policy", ident=PROXY, workload="billing", namespace="default"))
    assert status == 200 and body["policies"][0]["name"] == "billing-from-payment"
    assert body["version"] == 1
    assert call(api, req("GET", "/v1/policy", workload="Bad"))[0] == 400
    assert call(api, req("PUT", "/v1/resources"))[0] == 405
    assert call(api, req("DELETE", "/v1/resources/policies/default"))[0] == 404
    assert call(api, req("DELETE", "/v1/resources/pods/default/x"))[0] == 400
    assert call(api, req("DELETE", "/v1/resources/ap/default/billing-from-payment"))[0] == 200
    assert call(api, req("DELETE", "/v1/resources/ap/default/billing-from-payment"))[0] == 404
    # persisted after every change, and reloaded with its version
    again = load_store(tmp_path / "r.json")
    assert (len(again), again.version) == (0, 2)


def test_api_policy_watch_streams_changes() -> None:
    async def go() -> list[dict[str, Any]]:
        hub = WatchHub()
        api = ResourceAPI(Store(), hub, None, "cluster.local")
        resp = await api.handle(req("GET", "/v1/policy", ident=PROXY, workload="billing",
                                    namespace="default", watch="1"))
        assert isinstance(resp, Stream)
        it = resp.chunks.__aiter__()
        seen = [json.loads(await it.__anext__())]
        await api.handle(req("POST", "/v1/resources", ap({"targetRef": {"name": "web"}}, name="web")))
        await api.handle(req("POST", "/v1/resources", ap()))   # the one billing cares about
        seen.append(json.loads(await asyncio.wait_for(it.__anext__(), 2)))
        await api.handle(req("DELETE", "/v1/resources/ap/default/billing-from-payment"))
        seen.append(json.loads(await asyncio.wait_for(it.__anext__(), 2)))
        hub.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(it.__anext__(), 2)
        assert len(hub) == 0
        return seen

    seen = asyncio.run(go())
    assert [len(s["policies"]) for s in seen] == [0, 1, 0]
    versions = [s["version"] for s in seen]
    assert versions == sorted(versions) and versions[0] < versions[1] < versions[2]


# --- the CLI's pure parts (cli/resources.py)

def test_documents_yaml_json_and_lists() -> None:
    from cli.resources import documents
    text = "---\na: 1\n---\n---\n- b: 2\n- c: 3\n---\nkind: List\nitems: [{d: 4}]\n"
    assert documents(text, "f") == [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}]
    assert documents(json.dumps([ap(), ap(name="x")]), "f")[1]["metadata"]["name"] == "x"
    import click
    with pytest.raises(click.ClickException) as e:
        documents("a: [1", "f.yaml")
    assert str(e.value.message).startswith("f.yaml: not valid YAML or JSON") and "line" in e.value.message


def test_authz_counts_and_view() -> None:
    from cli.resources import authz_counts, authz_view, render_authz
    text = "\n".join([
        '# TYPE inbound_http_authz_allow_total counter',
        'inbound_http_authz_allow_total{namespace="default",workload="billing",authz_kind="authorizationpolicy",authz_name="bp"} 5',
        'inbound_http_authz_deny_total{namespace="default",workload="billing",authz_kind="authorizationpolicy",authz_name="bp,other"} 2',
        'inbound_tcp_authz_deny_total{namespace="default",workload="billing",authz_kind="default",authz_name="default:deny"} 1',
        'request_total{authz_name="bp"} 100',
    ])
    counts = authz_counts([text, text])
    assert counts["bp"] == {"allow": 10, "deny": 4} and counts["other"]["deny"] == 4
    assert counts["default:deny"] == {"allow": 0, "deny": 2}
    st = Store()
    st.apply(validate(ap(name="bp")))
    st.apply(validate(ap({"action": "DENY"}, name="empty")))
    snap = {"version": 2, "policies": st.policies_for("billing", "default")}
    view = authz_view("billing", "default", snap, [{"instance": "billing-1", "default": "deny", "known": True}],
                      counts)
    rows = {r["policy"]: r for r in view["rows"]}
    assert rows["bp"]["from"] == "sa:default/payment" and rows["bp"]["to"] == "GET,POST /charge*"
    assert (rows["bp"]["allowed"], rows["bp"]["denied"]) == (10, 4)
    assert rows["empty"]["from"] == "(no rules)"
    assert rows["[default]"]["from"] == "(overridden by ALLOW policies)" and not view["default_applies"]
    out = render_authz(view)
    assert out.splitlines()[0].startswith("billing.default: default inbound policy deny, 1 running replica")
    assert "DENY policies win over ALLOW policies." in out
