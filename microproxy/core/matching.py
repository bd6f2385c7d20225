"""Request matching: the ``matches[]`` of an HTTPRoute rule, parsed and compiled.

Theory of operation
-------------------
A ``Match`` (path, method, headers, query parameters) is config: parsed by ``parse_match``
from a Gateway API ``HTTPRouteMatch``, rendered back by ``Match.to_json``. A ``Matcher`` is
its compiled form for the hot path: everything is bytes, regular expressions are compiled
once, and ``matches()`` allocates nothing.

Semantics (Gateway API, as Linkerd implements it):

- ``Exact`` path: byte-for-byte equal (the query is not part of the path).
- ``PathPrefix``: element-wise: ``/foo`` (or ``/foo/``) matches ``/foo``, ``/foo/`` and
  ``/foo/bar``, never ``/foobar``; ``/`` matches everything.
- ``RegularExpression`` (path, header, query): the whole value must match (``fullmatch``).
- Headers: names are case-insensitive (the caller passes lower-case names); a header
  present several times matches when any of its values matches.
- Query parameters: names are case-sensitive, values percent-decoded; a repeated parameter
  is matched on its first occurrence.
- All conditions of a match must hold; a rule matches when any of its matches does.

``Matcher.rank`` orders matches by Gateway API precedence, highest first: an Exact path,
then the longest PathPrefix, then RegularExpression paths (longest pattern first); then a
method; then the most header matches; then the most query matches. ``routing`` breaks the
remaining ties by route age, route ``namespace/name``, then rule and match order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from .fields import HEADER_VALUE, TOKEN, fail, listed, mapping, only, string

EXACT, PREFIX, REGEX = "Exact", "PathPrefix", "RegularExpression"
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_PATH = re.compile(r"^/(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|%[0-9a-fA-F]{2})*$")
_RANK = {EXACT: 2, PREFIX: 1, REGEX: 0}


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: str   # EXACT, PREFIX or REGEX
    value: str


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header match (``name`` lower-cased) or a query parameter match (case-sensitive)."""
    name: str
    type: str   # EXACT or REGEX
    value: str


@dataclass(frozen=True, slots=True)
class Match:
    path: PathMatch
    method: str | None = None
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": {"type": self.path.type, "value": self.path.value}}
        if self.method:
            out["method"] = self.method
        for key, values in (("headers", self.headers), ("queryParams", self.query)):
            if values:
                out[key] = [{"type": v.type, "name": v.name, "value": v.value} for v in values]
        return out


DEFAULT_MATCH = Match(PathMatch(PREFIX, "/"))


# === parsing ===

def _regex(value: str, path: str) -> str:
    try:
        re.compile(value.encode())
    except re.error as e:
        raise fail(path, f"is not a valid regular expression ({e})") from None
    return value


def _path(value: Any, path: str) -> PathMatch:
    obj = mapping(value, path)
    only(obj, path, ("type", "value"))
    kind, raw = obj.get("type", PREFIX), obj.get("value", "/")
    if kind not in (EXACT, PREFIX, REGEX):
        raise fail(f"{path}.type", "must be Exact, PathPrefix or RegularExpression")
    if kind == REGEX:
        return PathMatch(kind, _regex(string(raw, f"{path}.value", None, 1024), f"{path}.value"))
    raw = string(raw, f"{path}.value", _PATH, 1024, "an absolute path like /api")
    if any(bad in raw for bad in ("//", "/./", "/../", "%2f", "%2F")) or raw.endswith(("/.", "/..")):
        raise fail(f"{path}.value", "must not contain //, /./, /../ or %2F, or end in /. or /..")
    return PathMatch(kind, raw)


def _values(obj: dict[str, Any], key: str, path: str, header: bool) -> tuple[ValueMatch, ...]:
    out: dict[str, ValueMatch] = {}
    for i, value in enumerate(listed(obj, key, path, 16)):
        where = f"{path}.{key}[{i}]"
        item = mapping(value, where)
        only(item, where, ("type", "name", "value"))
        kind = item.get("type", EXACT)
        if kind not in (EXACT, REGEX):
            raise fail(f"{where}.type", "must be Exact or RegularExpression")
        name = string(item.get("name"), f"{where}.name", TOKEN, 256, "a header or parameter name")
        raw = string(item.get("value"), f"{where}.value", HEADER_VALUE, 4096 if header else 1024,
                     "a value without control characters")
        name = name.lower() if header else name
        out.setdefault(name, ValueMatch(name, kind, _regex(raw, f"{where}.value") if kind == REGEX else raw))
    return tuple(out.values())


def parse_match(value: Any, path: str) -> Match:
    """One ``HTTPRouteMatch``; raises ``FieldError`` naming the field."""
    obj = mapping(value, path)
    only(obj, path, ("path", "headers", "queryParams", "method"))
    method = obj.get("method")
    if method is not None and method not in METHODS:
        raise fail(f"{path}.method", f"must be one of {', '.join(METHODS)}")
    return Match(_path(obj.get("path", {}), f"{path}.path"), method,
                 _values(obj, "headers", path, True), _values(obj, "queryParams", path, False))


# === matching ===

Headers = list[tuple[bytes, bytes]]


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """``a=1&b=%20`` -> {b"a": b"1", b"b": b" "}; the first occurrence of a name wins."""
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if part:
            name, _, value = part.partition(b"=")
            params.setdefault(unquote_to_bytes(name), unquote_to_bytes(value))
    return params


def _compile(values: tuple[ValueMatch, ...]) -> tuple[tuple[bytes, bytes, re.Pattern[bytes] | None], ...]:
    return tuple((v.name.encode(), v.value.encode(),
                  re.compile(v.value.encode()) if v.type == REGEX else None) for v in values)


class Matcher:
    __slots__ = ("prefix", "path", "regex", "method", "headers", "query", "rank")

    def __init__(self, match: Match) -> None:
        p = match.path
        self.prefix = p.type == PREFIX
        self.path = p.value.rstrip("/").encode() if p.type == PREFIX else p.value.encode()
        self.regex = re.compile(self.path) if p.type == REGEX else None
        self.method = match.method.encode() if match.method else None
        self.headers = _compile(match.headers)
        self.query = _compile(match.query)
        self.rank = (_RANK[p.type], len(self.path), self.method is not None,
                     len(self.headers), len(self.query))

    def matches(self, method: bytes, path: bytes, headers: Headers,
                params: dict[bytes, bytes] | None) -> bool:
        """``params``: ``parse_query(query)``; may be None when this matcher has no ``query``."""
        if self.prefix:
            n = len(self.path)
            if not path.startswith(self.path) or (len(path) > n and path[n] != 0x2F and n):
                return False
        elif self.regex is not None:
            if self.regex.fullmatch(path) is None:
                return False
        elif path != self.path:
            return False
        if self.method is not None and method != self.method:
            return False
        for name, exact, rx in self.headers:
            for hname, hvalue in headers:
                if hname == name and (hvalue == exact if rx is None else rx.fullmatch(hvalue)):
                    break
            else:
                return False
        for name, exact, rx in self.query:
            value = params.get(name) if params is not None else None
            if value is None or not (value == exact if rx is None else rx.fullmatch(value)):
                return False
        return True
