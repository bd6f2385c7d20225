"""The mesh's own resources (AuthorizationPolicy, later HTTPRoute ...): validation and the
store destination keeps them in. Pure: no I/O, no clock.

Theory of operation
-------------------
- A resource is a Kubernetes-style object: ``apiVersion``, ``kind``, ``metadata`` (``name``,
  ``namespace`` defaulting to ``default``, optional ``labels``/``annotations``) and ``spec``.
  ``validate()`` checks one against its ``Kind`` and returns it *normalized* (defaults
  filled in, service accounts qualified with their namespace, methods upper-cased), or
  raises ``ResourceError`` with a one-line message naming the field, e.g.
  ``spec.action: must be ALLOW, DENY or AUDIT``. Unknown fields are errors, not ignored:
  a typo in a security policy must not silently widen it.
- Kinds are data (``KINDS``): each has its API version, names (singular, plural, short
  aliases) and a spec validator. A new kind (HTTPRoute) is one more entry.
- ``Store`` holds the applied resources by (kind, namespace, name). Every change bumps one
  store-wide ``version`` that each resource records as its ``resourceVersion``; the
  counter is persisted with the store, so versions only grow, also across restarts.
  ``apply`` and ``delete`` return the *watch keys* they changed (``"policy:<ns>"``) so the
  server can wake the watchers of that namespace.
"""
from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from identity.tokens import valid_name
from microproxy.core import grpcroute, httproute as gateway
from microproxy.core.fields import FieldError
from microproxy.policy import ACTIONS

GROUP = "policy.micromesh.io"
API_VERSION = f"{GROUP}/v1alpha1"
STATE_FORMAT = 1
DEFAULT_NAMESPACE = "default"

_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*$")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_IDENTITY = re.compile(r"^[a-z0-9.-]+$")
_PATH = re.compile(r"^/[\x21-\x7e]*$")


class ResourceError(ValueError):
    """A resource that is refused; ``status`` is the HTTP status it maps to."""

    status = 400


class NotFound(ResourceError):
    status = 404


# === field helpers: each raises ResourceError("<path>: <problem>") ===

def _fail(path: str, problem: str) -> ResourceError:
    return ResourceError(f"{path}: {problem}")


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "must be a mapping")
    return value


def _only(obj: dict[str, Any], path: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in obj:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise _fail(where, f"unknown field (expected one of {', '.join(allowed)})")


def _string_list(obj: dict[str, Any], key: str, path: str,
                 check: Callable[[str, str], str]) -> list[str] | None:
    """``obj[key]`` as a non-empty list of strings, each passed through ``check``."""
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    where = f"{path}.{key}"
    if not isinstance(value, list):
        raise _fail(where, "must be a list")
    if not value:
        raise _fail(where, "must not be empty (leave it out to match anything)")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item:
            raise _fail(f"{where}[{i}]", "must be a non-empty string")
        out.append(check(item, f"{where}[{i}]"))
    return out


def _dns_label(value: str, path: str) -> str:
    if not valid_name(value):
        raise _fail(path, f"{value!r} is not a DNS-1123 label (lower-case letters, digits and '-')")
    return value


def _port(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise _fail(path, "must be a port number in 1..65535")
    return value


# === AuthorizationPolicy ===

def _service_account(namespace: str) -> Callable[[str, str], str]:
    def check(value: str, path: str) -> str:
        ns, sep, sa = value.partition("/")
        if not sep:
            ns, sa = namespace, value
        if not valid_name(ns) or not valid_name(sa):
            raise _fail(path, f"{value!r} is not a service account NAME or NAMESPACE/NAME")
        return f"{ns}/{sa}"
    return check


def _identity_pattern(value: str, path: str) -> str:
    body = value[1:] if value.startswith("*") else value[:-1] if value.endswith("*") else value
    if value != "*" and ("*" in body or not body or not _IDENTITY.match(body)):
        raise _fail(path, f"{value!r} is not an identity (a '*' is allowed only at the start or end)")
    return value


def _method(value: str, path: str) -> str:
    if not _TOKEN.match(value):
        raise _fail(path, f"{value!r} is not an HTTP method")
    return value.upper()


def _path_pattern(value: str, path: str) -> str:
    if value == "*":
        return value
    if not _PATH.match(value) or "*" in value[:-1] or "?" in value or "#" in value:
        raise _fail(path, f"{value!r} must be an absolute path like /exact or a prefix like "
                          "/prefix* (no query, '*' only at the end)")
    return value


def _from(value: Any, path: str, namespace: str) -> dict[str, Any]:
    obj = _mapping(value, path)
    _only(obj, path, ("serviceAccounts", "identities", "namespaces", "unauthenticated"))
    out: dict[str, Any] = {
        "serviceAccounts": _string_list(obj, "serviceAccounts", path, _service_account(namespace)),
        "identities": _string_list(obj, "identities", path, _identity_pattern),
        "namespaces": _string_list(obj, "namespaces", path, _dns_label),
    }
    unauth = obj.get("unauthenticated", False)
    if not isinstance(unauth, bool):
        raise _fail(f"{path}.unauthenticated", "must be true or false")
    out["unauthenticated"] = unauth
    if not (any(out[k] for k in ("serviceAccounts", "identities", "namespaces")) or unauth):
        raise _fail(path, "must list at least one of serviceAccounts, identities, namespaces or "
                          "unauthenticated: true (leave out `from` to match any caller)")
    return {k: v for k, v in out.items() if v is not None}


def _to(value: Any, path: str) -> dict[str, Any]:
    obj = _mapping(value, path)
    _only(obj, path, ("methods", "paths", "ports"))
    out: dict[str, Any] = {
        "methods": _string_list(obj, "methods", path, _method),
        "paths": _string_list(obj, "paths", path, _path_pattern),
    }
    ports = obj.get("ports")
    if ports is not None:
        if not isinstance(ports, list) or not ports:
            raise _fail(f"{path}.ports", "must be a non-empty list of port numbers")
        out["ports"] = [_port(p, f"{path}.ports[{i}]") for i, p in enumerate(ports)]
    out = {k: v for k, v in out.items() if v is not None}
    if not out:
        raise _fail(path, "must list at least one of methods, paths or ports "
                          "(leave out `to` to match any request)")
    return out


def validate_authorization_policy(spec: Any, namespace: str) -> dict[str, Any]:
    spec = _mapping({} if spec is None else spec, "spec")
    _only(spec, "spec", ("targetRef", "action", "rules"))
    out: dict[str, Any] = {}
    ref = spec.get("targetRef")
    if ref is None:
        out["targetRef"] = None   # every workload of the namespace
    else:
        ref = _mapping(ref, "spec.targetRef")
        _only(ref, "spec.targetRef", ("kind", "name", "port"))
        kind = ref.get("kind", "Workload")
        if kind != "Workload":
            raise _fail("spec.targetRef.kind", "must be Workload")
        name = ref.get("name")
        if not isinstance(name, str):
            raise _fail("spec.targetRef.name", "must be a workload name")
        _dns_label(name, "spec.targetRef.name")
        port = ref.get("port")
        out["targetRef"] = {"kind": "Workload", "name": name,
                            "port": None if port is None else _port(port, "spec.targetRef.port")}
    action = spec.get("action", "ALLOW")
    if action not in ACTIONS:
        raise _fail("spec.action", "must be ALLOW, DENY or AUDIT")
    out["action"] = action
    rules = spec.get("rules")
    if rules is None:
        rules = []
    if not isinstance(rules, list):
        raise _fail("spec.rules", "must be a list of rules")
    out["rules"] = []
    for i, rule in enumerate(rules):
        where = f"spec.rules[{i}]"
        rule = _mapping({} if rule is None else rule, where)
        _only(rule, where, ("from", "to"))
        norm: dict[str, Any] = {}
        if rule.get("from") is not None:
            norm["from"] = _from(rule["from"], f"{where}.from", namespace)
        if rule.get("to") is not None:
            norm["to"] = _to(rule["to"], f"{where}.to")
        out["rules"].append(norm)
    return out


# === kinds ===

@dataclass(frozen=True, slots=True)
class Kind:
    name: str                       # "AuthorizationPolicy"
    plural: str                     # "authorizationpolicies"
    aliases: tuple[str, ...]        # other names the CLI and the API accept
    api_version: str
    validate_spec: Callable[[Any, str], dict[str, Any]]
    watch_prefix: str               # watch keys are "<prefix>:<namespace>"
    other_versions: tuple[str, ...] = ()   # also accepted, stored as api_version
    # the whole object (after the metadata checks) -> the normalized spec; wins over validate_spec
    validate_object: Callable[[dict[str, Any]], dict[str, Any]] | None = None


# === HTTPRoute (Gateway API; the checks are microproxy.core.httproute's) ===

def _no_spec_check(spec: Any, namespace: str) -> dict[str, Any]:
    return _mapping(spec, "spec")


def validate_httproute(obj: dict[str, Any]) -> dict[str, Any]:
    """Parse with ``core.httproute`` (errors name the field); the canonical spec back."""
    try:
        route = gateway.parse_httproute(obj)
    except FieldError as e:
        raise ResourceError(str(e)) from None
    return route.to_json()["spec"]


def validate_grpcroute(obj: dict[str, Any]) -> dict[str, Any]:
    """Parse with ``core.grpcroute`` (errors name the field); the spec as given, checked."""
    try:
        grpcroute.parse_grpcroute(obj)
    except FieldError as e:
        raise ResourceError(str(e)) from None
    return {k: copy.deepcopy(v) for k, v in obj["spec"].items() if v is not None}   # (rules: null)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("AuthorizationPolicy", "authorizationpolicies",
         ("authorizationpolicy", "policy", "policies", "authz", "ap"), API_VERSION,
         validate_authorization_policy, "policy"),
    Kind(gateway.KIND, "httproutes", ("httproute", "routes", "route", "hr"), gateway.API_VERSIONS[0],
         _no_spec_check, "route", gateway.API_VERSIONS[1:], validate_httproute),
    Kind(grpcroute.KIND, "grpcroutes", ("grpcroute", "gr"), grpcroute.API_VERSIONS[0],
         _no_spec_check, "route", grpcroute.API_VERSIONS[1:], validate_grpcroute),
)}
ROUTE_KINDS = (gateway.KIND, grpcroute.KIND)


def kind_named(text: str) -> Kind:
    """A kind by its name, plural or alias (case-insensitive). Raises ResourceError."""
    low = text.lower()
    for kind in KINDS.values():
        if low in (kind.name.lower(), kind.plural, *kind.aliases):
            return kind
    raise ResourceError(f"kind: unknown kind {text!r} (known: {', '.join(KINDS)})")


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    namespace: str
    name: str
    body: dict[str, Any]     # the normalized object

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def ref(self) -> str:
        """``authorizationpolicy/billing-from-payment`` (kubectl's way of naming one)."""
        return f"{self.kind.lower()}/{self.name}"


def validate(obj: Any) -> Resource:
    """Check one resource; return it normalized. Raises ResourceError naming the field."""
    obj = _mapping(obj, "resource")
    _only(obj, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    kind_text = obj.get("kind")
    if not isinstance(kind_text, str) or not kind_text:
        raise _fail("kind", f"missing (known: {', '.join(KINDS)})")
    kind = KINDS.get(kind_text)
    if kind is None:
        raise _fail("kind", f"unknown kind {kind_text!r} (known: {', '.join(KINDS)})")
    if obj.get("apiVersion") != kind.api_version and obj.get("apiVersion") not in kind.other_versions:
        raise _fail("apiVersion", f"must be {kind.api_version}")
    meta = _mapping(obj.get("metadata"), "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _fail("metadata.name", "missing")
    if len(name) > 253 or not _SUBDOMAIN.match(name):
        raise _fail("metadata.name", f"{name!r} must be lower-case letters, digits, '-' and '.'")
    namespace = meta.get("namespace", DEFAULT_NAMESPACE)
    if not isinstance(namespace, str) or not valid_name(namespace):
        raise _fail("metadata.namespace", f"{namespace!r} is not a DNS-1123 label")
    norm_meta: dict[str, Any] = {"name": name, "namespace": namespace}
    for key in ("labels", "annotations"):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise _fail(f"metadata.{key}", "must map strings to strings")
        norm_meta[key] = dict(value)
    if isinstance(meta.get("creationTimestamp"), str):   # kept: routes are ordered by age
        norm_meta["creationTimestamp"] = meta["creationTimestamp"]
    if kind.validate_object is not None:
        spec = kind.validate_object({**obj, "apiVersion": kind.api_version, "metadata": norm_meta})
    else:
        spec = kind.validate_spec(obj.get("spec"), namespace)
    body = {"apiVersion": kind.api_version, "kind": kind.name, "metadata": norm_meta, "spec": spec}
    return Resource(kind.name, namespace, name, body)


# === the store ===

@dataclass(frozen=True, slots=True)
class Applied:
    resource: dict[str, Any]
    result: str                     # "created" | "configured" | "unchanged"
    changed: frozenset[str]         # watch keys to wake


class Store:
    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._items: dict[tuple[str, str, str], dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _watch_key(kind: str, namespace: str) -> str:
        return f"{KINDS[kind].watch_prefix}:{namespace}"

    def apply(self, res: Resource) -> Applied:
        """Create or replace a validated resource."""
        old = self._items.get(res.key)
        if old is not None and _content(old) == res.body:
            return Applied(copy.deepcopy(old), "unchanged", frozenset())
        self.version += 1
        body = copy.deepcopy(res.body)
        body["metadata"]["resourceVersion"] = self.version
        self._items[res.key] = body
        return Applied(copy.deepcopy(body), "created" if old is None else "configured",
                       frozenset({self._watch_key(res.kind, res.namespace)}))

    def delete(self, kind: str, namespace: str, name: str) -> frozenset[str]:
        if self._items.pop((kind, namespace, name), None) is None:
            raise NotFound(f"{kind.lower()}/{name} not found in namespace {namespace}")
        self.version += 1
        return frozenset({self._watch_key(kind, namespace)})

    def list(self, kind: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
        return [copy.deepcopy(body) for (k, ns, _), body in sorted(self._items.items())
                if (kind is None or k == kind) and (namespace is None or ns == namespace)]

    def policies_for(self, workload: str, namespace: str, port: int | None = None) -> list[dict[str, Any]]:
        """The AuthorizationPolicies in force for a workload, flattened for the proxy:
        ``{name, namespace, action, targetRef, rules}``, sorted by name."""
        out = []
        for (kind, ns, name), body in sorted(self._items.items()):
            if kind != "AuthorizationPolicy" or ns != namespace:
                continue
            spec = body["spec"]
            ref = spec.get("targetRef")
            if ref is not None and (ref["name"] != workload
                                    or (port is not None and ref.get("port") not in (None, port))):
                continue
            out.append({"name": name, "namespace": ns, "action": spec["action"],
                        "targetRef": copy.deepcopy(ref), "rules": copy.deepcopy(spec["rules"]),
                        "resourceVersion": body["metadata"]["resourceVersion"]})
        return out

    def httproutes(self) -> tuple[dict[str, Any], ...]:
        """Every stored HTTPRoute (bodies, not copies: callers only read them)."""
        return tuple(body for (kind, _, _), body in sorted(self._items.items()) if kind == gateway.KIND)

    def routes(self) -> tuple[dict[str, Any], ...]:
        """Every stored HTTPRoute and GRPCRoute (bodies, not copies: callers only read them)."""
        return tuple(body for (kind, _, _), body in sorted(self._items.items()) if kind in ROUTE_KINDS)

    # --- persistence

    def to_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "version": self.version,
                "resources": [self._items[k] for k in sorted(self._items)]}

    @classmethod
    def from_dict(cls, data: Any) -> "Store":
        """Load a saved store (every resource validated again). Raises ValueError."""
        try:
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown resources format {data.get('format')!r}")
            store = cls(int(data["version"]))
            for obj in data["resources"]:
                rv = int(obj["metadata"]["resourceVersion"])
                res = validate(_content(obj))
                body = copy.deepcopy(res.body)
                body["metadata"]["resourceVersion"] = min(rv, store.version)
                store._items[res.key] = body
        except (AttributeError, KeyError, TypeError) as e:
            raise ValueError(f"malformed resources state: {e!r}") from None
        return store


def _content(body: dict[str, Any]) -> dict[str, Any]:
    """A stored body without the server-set fields (what `apply` compares)."""
    out = dict(body)
    meta = dict(out.get("metadata") or {})
    meta.pop("resourceVersion", None)
    out["metadata"] = meta
    return out
