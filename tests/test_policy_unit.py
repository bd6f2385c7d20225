"""The authorization decision core (microproxy/policy.py): synchronous table tests."""
from __future__ import annotations

from typing import Any

import pytest

from microproxy.policy import (NOT_KNOWN, PolicyError, compile_policies, normalize_path,
                               request_path)

TD = "cluster.local"


def ident(sa: str, ns: str = "default") -> str:
    return f"{sa}.{ns}.serviceaccount.identity.{TD}"


PAYMENT, OTHER, PROM = ident("payment"), ident("other"), ident("prometheus", "monitoring")
PROD_WEB = ident("web", "prod")


def pol(name: str, action: str = "ALLOW", rules: list[dict[str, Any]] | None = None,
        port: int | None = None, namespace: str = "default") -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "action": action,
            "targetRef": {"kind": "Workload", "name": "billing", "port": port},
            "rules": rules if rules is not None else []}


def frm(**kw: Any) -> dict[str, Any]:
    return {"from": kw}


BILLING_FROM_PAYMENT = pol("billing-from-payment", rules=[frm(serviceAccounts=["default/payment"])])
METRICS_FROM_PROM = pol("metrics-from-prometheus", rules=[{
    "from": {"serviceAccounts": ["monitoring/prometheus"]},
    "to": {"methods": ["GET"], "paths": ["/metrics"]}}])

# (name, policies, mode, identity, method, target, allowed, authz)
CASES = [
    # defaults, no policies
    ("default allows all", [], "all-unauthenticated", None, b"GET", b"/", True, "default:all-unauthenticated"),
    ("all-authenticated: mTLS ok", [], "all-authenticated", OTHER, b"GET", b"/", True, "default:all-authenticated"),
    ("all-authenticated: plaintext denied", [], "all-authenticated", None, b"GET", b"/", False, "default:all-authenticated"),
    ("deny mode", [], "deny", PAYMENT, b"GET", b"/", False, "default:deny"),
    ("audit mode allows", [], "audit", None, b"GET", b"/", True, "default:audit"),
    # the seed's first example
    ("payment -> billing", [BILLING_FROM_PAYMENT], "all-unauthenticated", PAYMENT, b"POST", b"/charge", True, "billing-from-payment"),
    ("other -> billing", [BILLING_FROM_PAYMENT], "all-unauthenticated", OTHER, b"GET", b"/", False, "billing-from-payment"),
    ("plaintext -> billing", [BILLING_FROM_PAYMENT], "all-unauthenticated", None, b"GET", b"/", False, "billing-from-payment"),
    ("payment of another ns", [BILLING_FROM_PAYMENT], "all-unauthenticated", ident("payment", "prod"), b"GET", b"/", False, "billing-from-payment"),
    # the seed's second example
    ("prom GET /metrics", [METRICS_FROM_PROM], "all-unauthenticated", PROM, b"GET", b"/metrics", True, "metrics-from-prometheus"),
    ("prom GET /metrics?x=1", [METRICS_FROM_PROM], "all-unauthenticated", PROM, b"GET", b"/metrics?x=1", True, "metrics-from-prometheus"),
    ("prom POST /metrics", [METRICS_FROM_PROM], "all-unauthenticated", PROM, b"POST", b"/metrics", False, "metrics-from-prometheus"),
    ("prom GET /other", [METRICS_FROM_PROM], "all-unauthenticated", PROM, b"GET", b"/other", False, "metrics-from-prometheus"),
    ("prom GET /metrics/x (exact)", [METRICS_FROM_PROM], "all-unauthenticated", PROM, b"GET", b"/metrics/x", False, "metrics-from-prometheus"),
    ("other GET /metrics", [METRICS_FROM_PROM], "all-unauthenticated", OTHER, b"GET", b"/metrics", False, "metrics-from-prometheus"),
    # ALLOW policies override the default mode in both directions
    ("ALLOW beats deny mode", [BILLING_FROM_PAYMENT], "deny", PAYMENT, b"GET", b"/", True, "billing-from-payment"),
    ("ALLOW unauthenticated beats all-authenticated",
     [pol("open", rules=[frm(unauthenticated=True)])], "all-authenticated", None, b"GET", b"/", True, "open"),
    ("unauthenticated does not match mTLS callers",
     [pol("open", rules=[frm(unauthenticated=True)])], "all-unauthenticated", PAYMENT, b"GET", b"/", False, "open"),
    # DENY wins
    ("DENY beats ALLOW", [BILLING_FROM_PAYMENT, pol("no-payment", "DENY", [frm(serviceAccounts=["payment"])])],
     "all-unauthenticated", PAYMENT, b"GET", b"/", False, "no-payment"),
    ("DENY unmatched falls to ALLOW", [BILLING_FROM_PAYMENT, pol("no-other", "DENY", [frm(serviceAccounts=["other"])])],
     "all-unauthenticated", PAYMENT, b"GET", b"/", True, "billing-from-payment"),
    ("DENY only: unmatched uses the default", [pol("no-other", "DENY", [frm(serviceAccounts=["other"])])],
     "all-unauthenticated", PAYMENT, b"GET", b"/", True, "default:all-unauthenticated"),
    ("DENY only: default deny still applies", [pol("no-other", "DENY", [frm(serviceAccounts=["other"])])],
     "deny", PAYMENT, b"GET", b"/", False, "default:deny"),
    ("DENY path prefix", [pol("no-admin", "DENY", [{"to": {"paths": ["/admin*"]}}])],
     "all-unauthenticated", PAYMENT, b"GET", b"/admin/users", False, "no-admin"),
    ("DENY path prefix, dot segments", [pol("no-admin", "DENY", [{"to": {"paths": ["/admin*"]}}])],
     "all-unauthenticated", PAYMENT, b"GET", b"/x/../admin", False, "no-admin"),
    ("DENY path prefix, encoded", [pol("no-admin", "DENY", [{"to": {"paths": ["/admin*"]}}])],
     "all-unauthenticated", PAYMENT, b"GET", b"/%61dmin", False, "no-admin"),
    ("DENY path prefix, double slash", [pol("no-admin", "DENY", [{"to": {"paths": ["/admin*"]}}])],
     "all-unauthenticated", PAYMENT, b"GET", b"//admin", False, "no-admin"),
    # empty rules (Istio): ALLOW with no rules allows nothing; DENY with no rules denies nothing
    ("ALLOW no rules denies all", [pol("allow-nothing")], "all-unauthenticated", PAYMENT, b"GET", b"/", False, "allow-nothing"),
    ("DENY no rules denies nothing", [pol("deny-nothing", "DENY")], "all-unauthenticated", PAYMENT, b"GET", b"/", True, "default:all-unauthenticated"),
    ("rule {} allows all", [pol("allow-all", rules=[{}])], "deny", None, b"GET", b"/", True, "allow-all"),
    ("DENY rule {} denies all", [pol("deny-all", "DENY", [{}]), pol("allow-all", rules=[{}])], "all-unauthenticated", PAYMENT, b"GET", b"/", False, "deny-all"),
    # identities with wildcards, namespaces
    ("identity suffix wildcard", [pol("prod", rules=[frm(identities=["*.prod.serviceaccount.identity.cluster.local"])])],
     "all-unauthenticated", PROD_WEB, b"GET", b"/", True, "prod"),
    ("identity suffix wildcard, other ns", [pol("prod", rules=[frm(identities=["*.prod.serviceaccount.identity.cluster.local"])])],
     "all-unauthenticated", PAYMENT, b"GET", b"/", False, "prod"),
    ("identity * = any authenticated", [pol("mtls", rules=[frm(identities=["*"])])], "all-unauthenticated", OTHER, b"GET", b"/", True, "mtls"),
    ("identity * excludes plaintext", [pol("mtls", rules=[frm(identities=["*"])])], "all-unauthenticated", None, b"GET", b"/", False, "mtls"),
    ("identity prefix wildcard", [pol("pay", rules=[frm(identities=["payment.*"])])], "all-unauthenticated", PAYMENT, b"GET", b"/", True, "pay"),
    ("identity exact", [pol("exact", rules=[frm(identities=[PAYMENT])])], "all-unauthenticated", PAYMENT, b"GET", b"/", True, "exact"),
    ("namespaces", [pol("ns", rules=[frm(namespaces=["prod"])])], "all-unauthenticated", PROD_WEB, b"GET", b"/", True, "ns"),
    ("namespaces: other ns", [pol("ns", rules=[frm(namespaces=["prod"])])], "all-unauthenticated", PAYMENT, b"GET", b"/", False, "ns"),
    ("namespaces: not fooled by dotted sa", [pol("ns", rules=[frm(namespaces=["prod"])])],
     "all-unauthenticated", "a.b.prod.serviceaccount.identity.cluster.local", b"GET", b"/", False, "ns"),
    ("from: any listed source", [pol("mixed", rules=[frm(serviceAccounts=["other"], unauthenticated=True)])],
     "all-unauthenticated", None, b"GET", b"/", True, "mixed"),
    # methods and path prefixes
    ("methods + prefix", [pol("charge", rules=[{"to": {"methods": ["GET", "POST"], "paths": ["/charge*"]}}])],
     "all-unauthenticated", OTHER, b"POST", b"/charge/42", True, "charge"),
    ("methods mismatch", [pol("charge", rules=[{"to": {"methods": ["GET", "POST"], "paths": ["/charge*"]}}])],
     "all-unauthenticated", OTHER, b"DELETE", b"/charge/42", False, "charge"),
    ("path * = any", [pol("any", rules=[{"to": {"paths": ["*"]}}])], "deny", OTHER, b"GET", b"/x", True, "any"),
    ("from AND to", [pol("both", rules=[{"from": {"serviceAccounts": ["payment"]}, "to": {"methods": ["GET"]}}])],
     "all-unauthenticated", OTHER, b"GET", b"/", False, "both"),
    ("absolute-form target", [METRICS_FROM_PROM], "all-unauthenticated", PROM, b"GET", b"http://x:80/metrics", True, "metrics-from-prometheus"),
    # ports resolved at compile time (this proxy serves 7002)
    ("targetRef port mismatch: policy ignored", [pol("other-port", port=9999)], "all-unauthenticated", OTHER, b"GET", b"/", True, "default:all-unauthenticated"),
    ("targetRef port match", [pol("this-port", port=7002)], "all-unauthenticated", OTHER, b"GET", b"/", False, "this-port"),
    ("to.ports match", [pol("p", rules=[{"to": {"ports": [7002]}}])], "deny", OTHER, b"GET", b"/", True, "p"),
    ("to.ports mismatch: still an ALLOW policy", [pol("p", rules=[{"to": {"ports": [1]}}])], "all-unauthenticated", OTHER, b"GET", b"/", False, "p"),
    # opaque tunnels (method None)
    ("tunnel: from-only ALLOW", [BILLING_FROM_PAYMENT], "all-unauthenticated", PAYMENT, None, b"", True, "billing-from-payment"),
    ("tunnel: other denied", [BILLING_FROM_PAYMENT], "all-unauthenticated", OTHER, None, b"", False, "billing-from-payment"),
    ("tunnel: HTTP-only ALLOW never matches", [METRICS_FROM_PROM], "all-unauthenticated", PROM, None, b"", False, "metrics-from-prometheus"),
    ("tunnel: HTTP-only DENY still denies", [pol("no-post", "DENY", [{"to": {"methods": ["POST"]}}])],
     "all-unauthenticated", PROM, None, b"", False, "no-post"),
    ("tunnel: default deny", [], "deny", PROM, None, b"", False, "default:deny"),
]


@pytest.mark.parametrize("name,policies,mode,identity,method,target,allowed,authz", CASES,
                         ids=[c[0] for c in CASES])
def test_decide(name: str, policies: list[dict[str, Any]], mode: str, identity: str | None,
                method: bytes | None, target: bytes, allowed: bool, authz: str) -> None:
    c = compile_policies(policies, mode, TD, port=7002, version=3)
    d = c.decide(identity, method, target)
    assert (d.allowed, d.authz) == (allowed, authz)
    assert bool(d.reason) == (not allowed)
    assert f'authz_name="{authz}"' in d.metric_key


def test_decisions_are_prebuilt() -> None:
    c = compile_policies([BILLING_FROM_PAYMENT], "all-unauthenticated", TD, 7002)
    assert c.decide(PAYMENT, b"GET", b"/") is c.decide(PAYMENT, b"POST", b"/x")
    assert c.decide(OTHER, b"GET", b"/") is c.unmatched
    assert c.unmatched.reason == "denied by policy billing-from-payment"


def test_deny_reasons() -> None:
    two = compile_policies([pol("a", rules=[]), pol("b", rules=[])], port=1)
    assert two.decide(None, b"GET", b"/").reason == "denied by policies a, b"
    deny = compile_policies([pol("no", "DENY", [{}])], port=1)
    assert deny.decide(None, b"GET", b"/").reason == "denied by policy no"
    auth = compile_policies([], "all-authenticated")
    assert "no client identity" in auth.decide(None, b"GET", b"/").reason
    assert NOT_KNOWN.reason == "policy not yet known" and not NOT_KNOWN.allowed


def test_audit_policy_marks_without_changing_the_outcome() -> None:
    audit = pol("watch-post", "AUDIT", [{"to": {"methods": ["POST"]}}])
    c = compile_policies([audit, BILLING_FROM_PAYMENT], port=7002)
    d = c.decide(PAYMENT, b"POST", b"/")
    assert (d.allowed, d.authz, d.audit) == (True, "billing-from-payment", "watch-post")
    d = c.decide(OTHER, b"POST", b"/")
    assert (d.allowed, d.audit) == (False, "watch-post")
    assert c.decide(PAYMENT, b"GET", b"/").audit is None
    only_audit = compile_policies([pol("all", "AUDIT", [{}])], "deny")
    d = only_audit.decide(PAYMENT, b"GET", b"/")
    assert (d.allowed, d.authz, d.audit) == (False, "default:deny", "all")
    assert compile_policies([], "audit").decide(None, b"GET", b"/").audit == "default:audit"


def test_bare_service_account_uses_the_policy_namespace() -> None:
    p = pol("x", rules=[frm(serviceAccounts=["web"])], namespace="prod")
    c = compile_policies([p], port=1)
    assert c.decide(PROD_WEB, b"GET", b"/").allowed
    assert not c.decide(ident("web"), b"GET", b"/").allowed


@pytest.mark.parametrize("bad", [
    [{"namespace": "default", "action": "ALLOW"}],                      # no name
    [pol("x", "MAYBE")],                                                  # bad action
    [pol("x", rules=[frm(serviceAccounts="payment")])],                   # not a list
    ["not a mapping"],
])
def test_malformed_input_raises(bad: list[Any]) -> None:
    with pytest.raises(PolicyError):
        compile_policies(bad)


def test_unknown_mode_raises() -> None:
    with pytest.raises(PolicyError):
        compile_policies([], "allow-all")


@pytest.mark.parametrize("raw,norm", [
    (b"/a/b", b"/a/b"), (b"/a/./b", b"/a/b"), (b"/a/../b", b"/b"), (b"/../../b", b"/b"),
    (b"//a///b", b"/a/b"), (b"/a/", b"/a/"), (b"/a/..", b"/"), (b"/a/.", b"/a/"),
    (b"/%61%2Fb", b"/a%2Fb"), (b"/%7e", b"/~"), (b"/%2e%2e/x", b"/x"),
])
def test_normalize_path(raw: bytes, norm: bytes) -> None:
    assert normalize_path(raw) == norm


@pytest.mark.parametrize("target,path", [
    (b"/m?x=1", b"/m"), (b"/m#f", b"/m"), (b"*", b"*"), (b"http://h", b"/"),
    (b"http://h:1/a/./b?q", b"/a/b"), (b"/plain", b"/plain"),
])
def test_request_path(target: bytes, path: bytes) -> None:
    assert request_path(target) == path
