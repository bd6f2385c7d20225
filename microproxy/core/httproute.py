"""Gateway API ``HTTPRoute`` (gateway.networking.k8s.io/v1) -> validated frozen dataclasses.

Theory of operation
-------------------
``parse_httproute(doc)`` takes one resource as loaded from YAML/JSON and returns an
``HTTPRoute`` or raises ``FieldError`` (a ``ValueError``) naming the field, e.g.
``spec.rules[0].backendRefs[1].weight: must be an integer 0..1000000``. Unknown ``spec``
fields are errors; unknown ``metadata`` fields (uid, labels, ...) and ``status`` are ignored.

What is accepted (GAMMA: routes attach to Services, as in Linkerd):

- ``spec.parentRefs``: Services only: ``group: core`` or ``""``, ``kind: Service``, ``name``,
  optional ``namespace`` (default: the route's) and ``port`` (absent: every port).
- ``spec.rules[]`` (at most 16; absent: one rule matching everything):
  ``matches[]`` (absent: ``PathPrefix /``; parsed by ``matching.py``: ``path`` Exact,
  PathPrefix or RegularExpression, ``headers[]`` and ``queryParams[]`` Exact or
  RegularExpression, ``method``);
  ``backendRefs[]`` (Services: ``name``, ``port`` (required), ``weight`` 0..1000000,
  default 1; none: the parent Service itself); ``filters[]``: ``RequestHeaderModifier``,
  ``ResponseHeaderModifier`` (``set``/``add``/``remove``; at most one of each),
  ``RequestMirror`` (``backendRef``, ``percent`` 0..100, default 100; several allowed);
  ``timeouts`` (``request``, ``backendRequest``; ``"0s"`` disables; backendRequest may not
  exceed request); ``retry`` (experimental: ``codes``, ``attempts``, ``backoff``); ``name``.
- ``metadata.annotations``: Linkerd's ``retry.linkerd.io/{http,grpc,limit,timeout}``
  (``retry.py``) and micromesh's ``fault.micromesh.io/http`` (``fault.py``), for all rules.
- ``metadata.creationTimestamp`` (RFC 3339, UTC) orders routes by age (routing precedence).

Regular expressions use Python's ``re`` syntax (close to RE2 for the usual subset).

``HTTPRoute.to_json()`` renders the canonical document (defaults explicit, durations
canonical) and ``HTTPRoute.from_json`` parses it back: ``from_json(r.to_json()) == r``; this
is the form shipped over the destination API.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import fault as faults
from . import retry as retries
from .fault import Fault
from .fields import (HEADER_VALUE, TOKEN, FieldError, duration, fail, integer, listed, mapping,
                     only, render_duration, string)
from .matching import DEFAULT_MATCH, Match, parse_match
from .retry import RetryPolicy

GROUP = "gateway.networking.k8s.io"
API_VERSIONS = (f"{GROUP}/v1", f"{GROUP}/v1beta1")
KIND = "HTTPRoute"
MAX_WEIGHT = 1_000_000

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


@dataclass(frozen=True, slots=True)
class ParentRef:
    name: str
    namespace: str
    port: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"group": "core", "kind": "Service", "name": self.name, "namespace": self.namespace}
        return out if self.port is None else {**out, "port": self.port}


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    namespace: str
    port: int
    weight: int = 1

    def to_json(self, weight: bool = True) -> dict[str, Any]:
        out = {"name": self.name, "namespace": self.namespace, "port": self.port}
        return {**out, "weight": self.weight} if weight else out


@dataclass(frozen=True, slots=True)
class Mirror:
    backend: BackendRef
    percent: int = 100


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()    # names lower-cased
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {op: [{"name": n, "value": v} for n, v in pairs]
                               for op, pairs in (("set", self.set), ("add", self.add)) if pairs}
        return {**out, "remove": list(self.remove)} if self.remove else out


@dataclass(frozen=True, slots=True)
class Timeouts:
    request: float | None = None          # seconds; None: no timeout
    backend_request: float | None = None


NO_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True)
class Rule:
    matches: tuple[Match, ...]
    backends: tuple[BackendRef, ...]      # empty: the parent Service
    name: str | None = None
    timeouts: Timeouts = NO_TIMEOUTS
    retry: RetryPolicy | None = None      # rules[].retry; wins over the route's annotations
    mirrors: tuple[Mirror, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"matches": [m.to_json() for m in self.matches]}
        if self.name:
            out["name"] = self.name
        if self.backends:
            out["backendRefs"] = [b.to_json() for b in self.backends]
        filters: list[dict[str, Any]] = []
        for kind, key, mod in (("RequestHeaderModifier", "requestHeaderModifier", self.request_headers),
                               ("ResponseHeaderModifier", "responseHeaderModifier", self.response_headers)):
            if mod is not None:
                filters.append({"type": kind, key: mod.to_json()})
        filters += [{"type": "RequestMirror", "requestMirror": {
            "backendRef": m.backend.to_json(weight=False), "percent": m.percent}} for m in self.mirrors]
        if filters:
            out["filters"] = filters
        t = self.timeouts
        timeouts = {k: render_duration(v) for k, v in (("request", t.request),
                                                        ("backendRequest", t.backend_request)) if v}
        if timeouts:
            out["timeouts"] = timeouts
        if self.retry is not None:
            out["retry"] = retries.to_gateway(self.retry)
        return out


@dataclass(frozen=True, slots=True)
class HTTPRoute:
    name: str
    namespace: str
    parents: tuple[ParentRef, ...]
    rules: tuple[Rule, ...]
    hostnames: tuple[str, ...] = ()       # accepted and kept; not used for Service parents
    retry: RetryPolicy | None = None      # from retry.linkerd.io/* annotations
    fault: Fault | None = None            # from the fault.micromesh.io/http annotation
    created: str | None = None            # metadata.creationTimestamp

    def attaches_to(self, service: str, namespace: str, port: int) -> bool:
        return any(p.name == service and p.namespace == namespace and p.port in (None, port)
                   for p in self.parents)

    def to_json(self) -> dict[str, Any]:
        annotations = retries.to_annotations(self.retry) if self.retry is not None else {}
        if self.fault is not None:
            annotations[faults.ANNOTATION] = faults.render(self.fault)
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if annotations:
            meta["annotations"] = annotations
        if self.created:
            meta["creationTimestamp"] = self.created
        spec: dict[str, Any] = {"parentRefs": [p.to_json() for p in self.parents],
                                "rules": [r.to_json() for r in self.rules]}
        if self.hostnames:
            spec["hostnames"] = list(self.hostnames)
        return {"apiVersion": API_VERSIONS[0], "kind": KIND, "metadata": meta, "spec": spec}

    @classmethod
    def from_json(cls, obj: Any) -> HTTPRoute:
        return parse_httproute(obj)


# === parsing ===

def _label(value: Any, path: str) -> str:
    return string(value, path, _LABEL, 63, "a DNS-1123 label")


def _service(obj: dict[str, Any], path: str, parent: bool) -> None:
    if obj.get("kind", None if parent else "Service") != "Service":
        raise fail(f"{path}.kind", "must be Service (routes attach to and send to Services)")
    if obj.get("group", None if parent else "") not in ("", "core"):
        raise fail(f"{path}.group", 'must be "core" or "" (the Service API group)')


def _backend(value: Any, path: str, namespace: str, weight: bool) -> BackendRef:
    obj = mapping(value, path)
    only(obj, path, ("group", "kind", "name", "namespace", "port") + (("weight",) if weight else ()))
    _service(obj, path, parent=False)
    if "port" not in obj:
        raise fail(f"{path}.port", "is required for a Service backend")
    return BackendRef(_label(obj.get("name"), f"{path}.name"),
                      _label(obj.get("namespace", namespace), f"{path}.namespace"),
                      integer(obj["port"], f"{path}.port", 1, 65535),
                      integer(obj.get("weight", 1), f"{path}.weight", 0, MAX_WEIGHT))


def _parent(value: Any, path: str, namespace: str) -> ParentRef:
    obj = mapping(value, path)
    only(obj, path, ("group", "kind", "name", "namespace", "port"))
    _service(obj, path, parent=True)
    port = integer(obj["port"], f"{path}.port", 1, 65535) if obj.get("port") is not None else None
    return ParentRef(_label(obj.get("name"), f"{path}.name"),
                     _label(obj.get("namespace", namespace), f"{path}.namespace"), port)


def _header_name(value: Any, path: str) -> str:
    return string(value, path, TOKEN, 256, "an HTTP header name").lower()


def _modifier(value: Any, path: str) -> HeaderModifier:
    obj = mapping(value, path)
    only(obj, path, ("set", "add", "remove"))
    pairs: dict[str, tuple[tuple[str, str], ...]] = {}
    for op in ("set", "add"):
        out: dict[str, tuple[str, str]] = {}
        for i, item in enumerate(listed(obj, op, path, 16)):
            where = f"{path}.{op}[{i}]"
            only(mapping(item, where), where, ("name", "value"))
            name = _header_name(item.get("name"), f"{where}.name")
            if name in out:
                raise fail(f"{where}.name", f"header {name!r} is listed twice")
            out[name] = (name, string(item.get("value"), f"{where}.value", HEADER_VALUE, 4096,
                                      "a header value without control characters"))
        pairs[op] = tuple(out.values())
    remove = dict.fromkeys(_header_name(n, f"{path}.remove[{i}]")
                           for i, n in enumerate(listed(obj, "remove", path, 16)))
    return HeaderModifier(pairs["set"], pairs["add"], tuple(remove))


def _mirror(value: Any, path: str, namespace: str) -> Mirror:
    obj = mapping(value, path)
    only(obj, path, ("backendRef", "percent"))
    return Mirror(_backend(obj.get("backendRef"), f"{path}.backendRef", namespace, weight=False),
                  integer(obj.get("percent", 100), f"{path}.percent", 0, 100))


def _timeouts(value: Any, path: str) -> Timeouts:
    obj = mapping(value, path)
    only(obj, path, ("request", "backendRequest"))
    request, backend = (duration(obj[k], f"{path}.{k}") if k in obj else 0.0
                        for k in ("request", "backendRequest"))
    if request and backend > request:
        raise fail(f"{path}.backendRequest", "must not be longer than timeouts.request")
    return Timeouts(request or None, backend or None)


_FILTERS = {"RequestHeaderModifier": "requestHeaderModifier",
            "ResponseHeaderModifier": "responseHeaderModifier", "RequestMirror": "requestMirror"}


def _rule(value: Any, path: str, namespace: str) -> Rule:
    obj = mapping(value, path)
    only(obj, path, ("name", "matches", "filters", "backendRefs", "timeouts", "retry"))
    name = string(obj["name"], f"{path}.name", _SUBDOMAIN, 253, "a DNS-1123 subdomain") \
        if obj.get("name") is not None else None
    matches = tuple(parse_match(m, f"{path}.matches[{i}]")
                    for i, m in enumerate(listed(obj, "matches", path, 64))) or (DEFAULT_MATCH,)
    backends = tuple(_backend(b, f"{path}.backendRefs[{i}]", namespace, weight=True)
                     for i, b in enumerate(listed(obj, "backendRefs", path, 16)))
    mods: dict[str, HeaderModifier] = {}
    mirrors: list[Mirror] = []
    for i, item in enumerate(listed(obj, "filters", path, 16)):
        where = f"{path}.filters[{i}]"
        kind = mapping(item, where).get("type")
        if not isinstance(kind, str) or kind not in _FILTERS:
            raise fail(f"{where}.type", f"must be one of {', '.join(_FILTERS)} ({kind!r} is not supported)")
        key = _FILTERS[kind]
        only(item, where, ("type", key))
        if key not in item:
            raise fail(f"{where}.{key}", f"is required when type is {kind}")
        if kind == "RequestMirror":
            mirrors.append(_mirror(item[key], f"{where}.{key}", namespace))
        elif kind in mods:
            raise fail(f"{where}.type", f"{kind} may appear only once in a rule")
        else:
            mods[kind] = _modifier(item[key], f"{where}.{key}")
    timeouts = _timeouts(obj["timeouts"], f"{path}.timeouts") if obj.get("timeouts") is not None \
        else NO_TIMEOUTS
    retry = retries.from_gateway(obj["retry"], f"{path}.retry") if obj.get("retry") is not None else None
    return Rule(matches, backends, name, timeouts, retry, tuple(mirrors),
                mods.get("RequestHeaderModifier"), mods.get("ResponseHeaderModifier"))


def _timestamp(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):   # YAML loaders turn unquoted timestamps into datetimes
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return string(value, "metadata.creationTimestamp", _TIMESTAMP, 40, "an RFC 3339 UTC time")


def parse_httproute(doc: Any) -> HTTPRoute:
    """Validate one HTTPRoute document; raises ``FieldError`` naming the offending field."""
    if not isinstance(doc, dict):
        raise FieldError("HTTPRoute: must be a mapping")
    only(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if doc.get("apiVersion") not in API_VERSIONS:
        raise fail("apiVersion", f"must be {API_VERSIONS[0]}")
    if doc.get("kind") != KIND:
        raise fail("kind", f"must be {KIND}")
    meta = mapping(doc.get("metadata"), "metadata")
    name = string(meta.get("name"), "metadata.name", _SUBDOMAIN, 253, "a DNS-1123 subdomain")
    namespace = _label(meta.get("namespace", "default"), "metadata.namespace")
    raw = meta.get("annotations")
    annotations = {} if raw is None else mapping(raw, "metadata.annotations")
    spec = mapping(doc.get("spec"), "spec")
    only(spec, "spec", ("parentRefs", "hostnames", "rules"))
    parents = tuple(_parent(p, f"spec.parentRefs[{i}]", namespace)
                    for i, p in enumerate(listed(spec, "parentRefs", "spec", 32)))
    if not parents:
        raise fail("spec.parentRefs", "must name at least one Service")
    hostnames = tuple(string(h, f"spec.hostnames[{i}]", _HOSTNAME, 253, "a hostname")
                      for i, h in enumerate(listed(spec, "hostnames", "spec", 16)))
    rules = tuple(_rule(r, f"spec.rules[{i}]", namespace)
                  for i, r in enumerate(listed(spec, "rules", "spec", 16))) or (Rule((DEFAULT_MATCH,), ()),)
    where = f'metadata.annotations["{faults.ANNOTATION}"]'
    fault = faults.parse(annotations[faults.ANNOTATION], where) if faults.ANNOTATION in annotations else None
    return HTTPRoute(name, namespace, parents, rules, hostnames,
                     retries.from_annotations(annotations, "metadata.annotations"), fault,
                     _timestamp(meta.get("creationTimestamp")))
