"""Inbound authorization: the pure decision core (no asyncio, no clock, no I/O).

Theory of operation
-------------------
Destination sends a proxy the *normalized* AuthorizationPolicy resources that target its
workload (``destination/resources.py`` validates and normalizes them). When a new set
arrives, ``compile_policies`` turns it into a ``Compiled`` object once; each request then
costs a few set lookups and string comparisons in ``Compiled.decide`` and gets back one of
a handful of ``Decision`` objects built at compile time (nothing is allocated or cached per
request, except for the rare AUDIT match).

Semantics (Istio's AuthorizationPolicy, with Linkerd's default inbound policies):

1. A *rule* matches a request when its ``from`` AND its ``to`` match. A rule without
   ``from`` matches any caller; without ``to``, any request. Within ``from``, any listed
   source matches (serviceAccounts, identities, namespaces, unauthenticated); within
   ``to``, every listed field must match (methods, paths, ports).
2. A *policy* matches when any of its rules matches. A policy with no rules matches
   nothing; a rule ``{}`` matches everything (Istio: ``rules: [{}]`` allows all, an ALLOW
   policy without rules allows nothing).
3. If any DENY policy matches, the request is denied (DENY wins).
4. Else, if any ALLOW policy targets the workload, the request is allowed when one of
   them matches and denied otherwise (with ALLOW policies present, unmatched requests are
   denied).
5. Else the workload's *default inbound policy* decides: ``all-unauthenticated`` allows
   everything, ``all-authenticated`` allows callers with a mesh identity (mTLS),
   ``deny`` denies everything, ``audit`` allows everything and asks for an audit log.
6. AUDIT policies never change the outcome: when one matches, the decision carries its
   name and the proxy logs the request at INFO.

Callers: ``identity`` is the verified client identity from mTLS, None for plaintext (or
TLS without a client certificate): that is what ``unauthenticated: true`` matches.

Ports: a proxy serves one port (its workload's service port), so ``targetRef.port`` and
``to.ports`` are resolved when compiling: a policy for another port does not apply at all;
a rule whose ports do not include ours can never match.

Opaque TCP (CONNECT tunnels) has no method or path. A rule that constrains methods or
paths therefore never matches a tunnel in ALLOW and AUDIT policies (fail closed), while
DENY policies ignore those HTTP-only fields for tunnels (so a DENY still denies). This is
Istio's rule for HTTP fields on TCP traffic.

Paths are matched without the query string, after a light normalization (percent-encoded
unreserved characters decoded, ``//`` merged, ``.``/``..`` segments removed), so that
``/./admin`` cannot slip past a DENY for ``/admin*``. A path pattern is exact (``/metrics``)
or a prefix with a trailing ``*`` (``/charge*``); ``*`` alone is any path. Identity
patterns are exact, ``*`` (any identity), ``*suffix`` or ``prefix*``.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .metrics import labels

MODES = ("all-unauthenticated", "all-authenticated", "deny", "audit")
DEFAULT_MODE = "all-unauthenticated"
ALLOW, DENY, AUDIT = "ALLOW", "DENY", "AUDIT"
ACTIONS = (ALLOW, DENY, AUDIT)
ID_INFIX = ".serviceaccount.identity."


class PolicyError(ValueError):
    """A policy set the proxy cannot compile (destination validates, so: a bug or a skew)."""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    authz: str              # the policy that decided, or "default:<mode>"
    kind: str               # "authorizationpolicy" | "default"
    reason: str             # why it was denied ("" when allowed)
    metric_key: str         # the label string for the authz counters
    audit: str | None = None  # the AUDIT policy (or "default:audit") asking for a log line


def decision(allowed: bool, authz: str, kind: str, reason: str = "",
             audit: str | None = None) -> Decision:
    return Decision(allowed, authz, kind, reason,
                    labels(authz_kind=kind, authz_name=authz), audit)


NOT_KNOWN = decision(False, "default:unknown", "default", "policy not yet known")


# === paths ===

_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_NEEDS_NORMALIZING = re.compile(rb"%|/\.|//")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _unescape_unreserved(m: re.Match[bytes]) -> bytes:
    c = int(m.group(1), 16)
    return bytes((c,)) if c in _UNRESERVED else b"%" + m.group(1).upper()


def normalize_path(path: bytes) -> bytes:
    """RFC 3986 normalization of an absolute path: unreserved %XX decoded, empty segments
    merged, dot segments removed (never above the root)."""
    if b"%" in path:
        path = _PCT.sub(_unescape_unreserved, path)
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        elif seg == b".":
            if last:
                out.append(b"")
        elif seg or last:
            out.append(seg)
    return b"/" + b"/".join(out)


def request_path(target: bytes) -> bytes:
    """The path a request target names: query and fragment dropped, normalized."""
    if target[:1] != b"/":
        i = target.find(b"://")
        if i <= 0:
            return target  # "*" (OPTIONS) or an authority: nothing to normalize
        j = target.find(b"/", i + 3)
        target = target[j:] if j >= 0 else b"/"
    k = target.find(b"?")
    if k >= 0:
        target = target[:k]
    k = target.find(b"#")
    if k >= 0:
        target = target[:k]
    if _NEEDS_NORMALIZING.search(target) is not None:
        target = normalize_path(target)
    return target


# === compiled matchers ===

class _Source:
    """A compiled ``from``: any listed source matches."""

    __slots__ = ("exact", "prefixes", "suffixes", "any_identity", "ns_suffixes", "unauthenticated")

    def __init__(self, spec: Mapping[str, Any], namespace: str, trust_domain: str) -> None:
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        self.any_identity = False
        for sa in _strings(spec, "serviceAccounts"):
            ns, _, name = sa.rpartition("/")
            exact.add(f"{name}.{ns or namespace}{ID_INFIX}{trust_domain}")
        for pattern in _strings(spec, "identities"):
            if pattern == "*":
                self.any_identity = True
            elif pattern.startswith("*"):
                suffixes.append(pattern[1:])
            elif pattern.endswith("*"):
                prefixes.append(pattern[:-1])
            else:
                exact.add(pattern)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        self.ns_suffixes = tuple(f".{ns}{ID_INFIX}{trust_domain}" for ns in _strings(spec, "namespaces"))
        self.unauthenticated = spec.get("unauthenticated") is True

    @property
    def exact_only(self) -> bool:
        return not (self.any_identity or self.prefixes or self.suffixes or self.ns_suffixes
                    or self.unauthenticated)

    def match(self, identity: str | None) -> bool:
        if identity is None:
            return self.unauthenticated
        if self.any_identity or identity in self.exact:
            return True
        for s in self.suffixes:
            if identity.endswith(s):
                return True
        for p in self.prefixes:
            if identity.startswith(p):
                return True
        for s in self.ns_suffixes:
            # "sa" + ".ns.serviceaccount.identity.td": the head must be one label
            if identity.endswith(s) and len(identity) > len(s) and "." not in identity[: -len(s)]:
                return True
        return False


class _Target:
    """A compiled ``to`` (ports already resolved): every listed field must match."""

    __slots__ = ("methods", "exact_paths", "path_prefixes", "any_path")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        methods = _strings(spec, "methods")
        self.methods = frozenset(m.upper().encode("ascii") for m in methods) if methods else None
        paths = _strings(spec, "paths")
        self.any_path = not paths or "*" in paths
        self.exact_paths = frozenset(p.encode() for p in paths if not p.endswith("*"))
        self.path_prefixes = tuple(p[:-1].encode() for p in paths if p.endswith("*"))

    @property
    def http_only(self) -> bool:
        return self.methods is not None or not self.any_path

    def match(self, method: bytes, path: bytes) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.any_path or path in self.exact_paths:
            return True
        for p in self.path_prefixes:
            if path.startswith(p):
                return True
        return False


class _Rule:
    __slots__ = ("source", "target", "tunnels")

    def __init__(self, source: _Source | None, target: _Target | None, action: str) -> None:
        self.source = source
        self.target = target
        # what this rule says about an opaque tunnel once its ``from`` matched
        self.tunnels = target is None or not target.http_only or action == DENY

    def match(self, identity: str | None, method: bytes | None, path: bytes) -> bool:
        if self.source is not None and not self.source.match(identity):
            return False
        if self.target is None:
            return True
        if method is None:
            return self.tunnels
        return self.target.match(method, path)


class _Policy:
    __slots__ = ("name", "action", "rules", "on_match", "needs_path")

    def __init__(self, name: str, action: str, rules: tuple[_Rule, ...]) -> None:
        self.name = name
        self.action = action
        self.rules = rules
        self.needs_path = any(r.target is not None and not r.target.any_path for r in rules)
        if action == DENY:
            self.on_match = decision(False, name, "authorizationpolicy", f"denied by policy {name}")
        else:
            self.on_match = decision(True, name, "authorizationpolicy")

    def match(self, identity: str | None, method: bytes | None, path: bytes) -> bool:
        for r in self.rules:
            if r.match(identity, method, path):
                return True
        return False


# One flattened rule, as ``decide`` walks them: (exact identities or None for "any caller",
# the rest of the source or None, the target or None, tunnels?, the policy).
_Flat = tuple[frozenset[str] | None, _Source | None, _Target | None, bool, _Policy]


def _flatten(policies: Sequence[_Policy]) -> tuple[_Flat, ...]:
    out: list[_Flat] = []
    for p in policies:
        for r in p.rules:
            src = r.source
            if src is None:
                out.append((None, None, r.target, r.tunnels, p))
            else:
                out.append((src.exact, None if src.exact_only else src, r.target, r.tunnels, p))
    return tuple(out)


def _first(rules: tuple[_Flat, ...], identity: str | None, method: bytes | None,
           path: bytes) -> _Policy | None:
    """The policy of the first rule matching the request (the hot loop: no calls for a
    rule whose caller is not in its exact identities and that has nothing else)."""
    for exact, other, target, tunnels, pol in rules:
        if exact is not None and identity not in exact and (other is None or not other.match(identity)):
            continue
        if target is None:
            return pol
        if method is None:
            if tunnels:
                return pol
        elif target.match(method, path):
            return pol
    return None


class Compiled:
    """The policies in force for one workload port, ready to decide requests."""

    def __init__(self, mode: str, version: int, denies: Sequence[_Policy],
                 allows: Sequence[_Policy], audits: Sequence[_Policy]) -> None:
        self.mode = mode
        self.version = version
        self.denies = tuple(denies)
        self.allows = tuple(allows)
        self.audits = tuple(audits)
        self.needs_path = any(p.needs_path for p in (*self.denies, *self.allows, *self.audits))
        self._deny_rules = _flatten(self.denies)
        self._allow_rules = _flatten(self.allows)
        self._audit_rules = _flatten(self.audits)
        names = sorted(p.name for p in self.allows)
        joined = ",".join(names)
        self.unmatched = decision(False, joined, "authorizationpolicy",
                                  f"denied by polic{'y' if len(names) == 1 else 'ies'} "
                                  f"{', '.join(names)}")
        d = f"default:{mode}"
        self.default_allow = decision(True, d, "default", audit=d if mode == "audit" else None)
        if mode == "all-authenticated":
            why = f"denied by default policy {mode} (no client identity)"
        else:
            why = f"denied by default policy {mode}"
        self.default_deny = decision(False, d, "default", why)

    def decide(self, identity: str | None, method: bytes | None, target: bytes = b"") -> Decision:
        """Decide one request. ``method`` None means an opaque TCP tunnel."""
        path = request_path(target) if self.needs_path and method is not None else target
        p = _first(self._deny_rules, identity, method, path) if self._deny_rules else None
        if p is not None:
            d = p.on_match
        elif self.allows:
            p = _first(self._allow_rules, identity, method, path)
            d = self.unmatched if p is None else p.on_match
        else:
            mode = self.mode
            if mode == "all-unauthenticated" or mode == "audit" or (
                    mode == "all-authenticated" and identity is not None):
                d = self.default_allow
            else:
                d = self.default_deny
        if self._audit_rules:
            p = _first(self._audit_rules, identity, method, path)
            if p is not None:
                return Decision(d.allowed, d.authz, d.kind, d.reason, d.metric_key, p.name)
        return d

    def describe(self) -> dict[str, Any]:
        return {"default": self.mode, "version": self.version,
                "policies": [{"name": p.name, "action": p.action, "rules": len(p.rules)}
                             for p in (*self.denies, *self.allows, *self.audits)]}


# === compiling ===

def _strings(spec: Mapping[str, Any], key: str) -> list[str]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{key} must be a list of strings")
    return value


def _port_ok(ports: Iterable[Any], port: int | None) -> bool:
    return port is not None and any(p == port for p in ports)


def compile_policies(policies: Iterable[Mapping[str, Any]], mode: str = DEFAULT_MODE,
                     trust_domain: str = "cluster.local", port: int | None = None,
                     version: int = 0) -> Compiled:
    """Compile normalized policies (as ``GET /v1/policy`` lists them) for a proxy whose
    workload serves ``port``. Raises PolicyError on malformed input."""
    if mode not in MODES:
        raise PolicyError(f"unknown default inbound policy {mode!r}")
    by_action: dict[str, list[_Policy]] = {ALLOW: [], DENY: [], AUDIT: []}
    try:
        for pol in policies:
            name, namespace, action = str(pol["name"]), str(pol["namespace"]), pol.get("action", ALLOW)
            if action not in ACTIONS:
                raise PolicyError(f"policy {name}: unknown action {action!r}")
            ref = pol.get("targetRef") or {}
            if ref.get("port") is not None and ref["port"] != port:
                continue  # targets another port of the workload
            rules = []
            for raw in pol.get("rules") or ():
                src, dst = raw.get("from"), raw.get("to")
                if dst is not None and dst.get("ports") is not None and not _port_ok(dst["ports"], port):
                    continue  # can never match on this port
                target = _Target(dst) if dst is not None and (dst.get("methods") or dst.get("paths")) else None
                source = _Source(src, namespace, trust_domain) if src is not None else None
                rules.append(_Rule(source, target, action))
            by_action[action].append(_Policy(name, action, tuple(rules)))
    except (KeyError, TypeError, AttributeError, UnicodeEncodeError) as e:
        raise PolicyError(f"malformed policy: {e!r}") from None
    return Compiled(mode, version, by_action[DENY], by_action[ALLOW], by_action[AUDIT])
