"""Gateway API ``GRPCRoute`` (gateway.networking.k8s.io/v1) -> the routing model of
``httproute.py``: a gRPC call is an HTTP/2 POST to ``/package.Service/Method``.

Theory of operation
-------------------
``parse_grpcroute(doc)`` checks what is GRPCRoute's own (``rules[].matches[].method``) with
errors naming its fields, turns each method match into an HTTPRoute path match, and hands
the rest, whose shape the two kinds share (``parentRefs``, ``hostnames``, ``headers``
matches, ``filters``, ``backendRefs``, the ``retry.linkerd.io/*`` and fault annotations),
to ``parse_httproute``; so a GRPCRoute and the equivalent HTTPRoute route alike, everywhere
routes are used (proxies, ``mesh routes``, route metrics).

Method matches (at least one of ``service`` and ``method``; ``type`` Exact, the default, or
RegularExpression):

=======================  ===========================================================
service ``S``, method M  path Exact ``/S/M``
service ``S`` only       path PathPrefix ``/S`` (every method of the service)
method ``M`` only        path RegularExpression ``/[^/]+/M`` (M escaped)
RegularExpression        path RegularExpression ``/S/M``, ``[^/]+`` for a missing part
=======================  ===========================================================

and every converted match also requires ``POST`` (gRPC's method). No method match: every
call, as the regular expression ``/.*`` so that it ranks below every method match. GRPCRoute has no ``timeouts`` or ``retry`` in v1; the annotations
serve for retries, as in Linkerd.
"""
from __future__ import annotations

import re
from typing import Any

from .fields import FieldError, fail, listed, mapping, only, string
from .httproute import GROUP, HTTPRoute, parse_httproute

API_VERSIONS = (f"{GROUP}/v1", f"{GROUP}/v1alpha2")
KIND = "GRPCRoute"

_SERVICE = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$")
_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
# a match without a method: every call, ranked below every method match (GRPCRoute's
# precedence: the more of service and method a match names, the higher; an HTTPRoute
# PathPrefix "/" would outrank the regular expressions a method-only match becomes)
ANY_CALL = {"type": "RegularExpression", "value": "/.*"}


def _method_match(value: Any, path: str) -> dict[str, Any]:
    obj = mapping(value, path)
    only(obj, path, ("type", "service", "method"))
    kind = obj.get("type", "Exact")
    if kind not in ("Exact", "RegularExpression"):
        raise fail(f"{path}.type", "must be Exact or RegularExpression")
    exact = kind == "Exact"
    parts: dict[str, str] = {}
    for key, pattern in (("service", _SERVICE), ("method", _METHOD)):
        if obj.get(key) is None:
            continue
        text = string(obj[key], f"{path}.{key}", pattern if exact else None, 1024,
                      "a gRPC service name (package.Service)" if key == "service" else "a gRPC method name")
        if not exact:
            try:
                re.compile(text)
            except re.error as e:
                raise fail(f"{path}.{key}", f"is not a regular expression: {e}") from None
        parts[key] = text
    if not parts:
        raise fail(path, "must name a service, a method or both")
    service, method = parts.get("service"), parts.get("method")
    if exact and service and method:
        return {"type": "Exact", "value": f"/{service}/{method}"}
    if exact and service:
        return {"type": "PathPrefix", "value": f"/{service}"}
    if exact:
        return {"type": "RegularExpression", "value": f"/[^/]+/{re.escape(method or '')}"}
    value = f"/{_group(service) if service else '[^/]+'}/{_group(method) if method else '[^/]+'}"
    if len(value) > 1024:
        raise fail(path, "service and method together must be at most 1020 characters")
    try:
        re.compile(value.encode())   # (paths are matched as bytes)
    except re.error as e:   # e.g. a flag the parts cannot carry inside the path
        raise fail(path, f"is not a regular expression: {e}") from None
    return {"type": "RegularExpression", "value": value}


_FLAGS = re.compile(r"^\(\?([imsx]+)\)(.*)$", re.S)


def _group(part: str) -> str:
    """One part of ``/service/method`` as a group (an alternation stays inside it); leading
    inline flags such as ``(?i)`` become the group's own: ``(?i:...)``."""
    m = _FLAGS.match(part)
    return f"(?{m[1]}:{m[2]})" if m else f"(?:{part})"


def _rule(value: Any, path: str) -> dict[str, Any]:
    obj = mapping(value, path)
    only(obj, path, ("name", "matches", "filters", "backendRefs"))
    out = {k: v for k, v in obj.items() if k != "matches"}
    matches = []
    for i, m in enumerate(listed(obj, "matches", path, 64)):
        where = f"{path}.matches[{i}]"
        m = mapping(m, where)
        only(m, where, ("method", "headers"))
        match: dict[str, Any] = {"method": "POST", "path": ANY_CALL}
        if m.get("method") is not None:
            match["path"] = _method_match(m["method"], f"{where}.method")
        if m.get("headers") is not None:
            match["headers"] = m["headers"]
        matches.append(match)
    out["matches"] = matches or [{"method": "POST", "path": ANY_CALL}]
    return out


def to_httproute(doc: Any) -> dict[str, Any]:
    """The equivalent HTTPRoute document. Raises ``FieldError`` naming GRPCRoute's fields."""
    if not isinstance(doc, dict):
        raise FieldError("GRPCRoute: must be a mapping")
    only(doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    if doc.get("apiVersion") not in API_VERSIONS:
        raise fail("apiVersion", f"must be {API_VERSIONS[0]}")
    if doc.get("kind") != KIND:
        raise fail("kind", f"must be {KIND}")
    spec = mapping(doc.get("spec"), "spec")
    only(spec, "spec", ("parentRefs", "hostnames", "rules"))
    http_spec = dict(spec)
    if spec.get("rules") is not None:
        http_spec["rules"] = [_rule(r, f"spec.rules[{i}]") for i, r in enumerate(listed(spec, "rules", "spec", 16))]
    else:
        http_spec["rules"] = [{"matches": [{"method": "POST", "path": ANY_CALL}]}]
    return {"apiVersion": f"{GROUP}/v1", "kind": "HTTPRoute", "metadata": doc.get("metadata"),
            "spec": http_spec}


def parse_grpcroute(doc: Any) -> HTTPRoute:
    """Validate one GRPCRoute document -> the routing model (an ``HTTPRoute``)."""
    return parse_httproute(to_httproute(doc))
