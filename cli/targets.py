"""Resource targets as Linkerd writes them, and which replicas they select.

On the local mesh a workload is a Deployment (``deploy/books``), each of its replicas a
Pod (``pod/books-3f7c``, the instance id), and a namespace is a namespace
(``ns/default``). ``authority/books.default:7002`` names what clients asked for. A target
is ``TYPE/NAME``, or a type alone (every resource of that type), or ``TYPE NAME`` as two
arguments, like ``linkerd viz stat deploy books``.

Pure: strings in, ``Target`` out; a ``TargetError`` carries a one-line message.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

DEPLOY, POD, NS, AUTHORITY = "deploy", "pod", "ns", "authority"
KINDS = (DEPLOY, POD, NS, AUTHORITY)
ALIASES = {
    "deploy": DEPLOY, "deployment": DEPLOY, "deployments": DEPLOY, "deploys": DEPLOY,
    "po": POD, "pod": POD, "pods": POD,
    "ns": NS, "namespace": NS, "namespaces": NS,
    "au": AUTHORITY, "authority": AUTHORITY, "authorities": AUTHORITY,
}
# The names Linkerd's JSON output uses for each kind ("kind": "deployment").
CANONICAL = {DEPLOY: "deployment", POD: "pod", NS: "namespace", AUTHORITY: "authority"}


class TargetError(ValueError):
    """A target the user wrote that we cannot use (one line)."""


@dataclass(frozen=True, slots=True)
class Target:
    kind: str                 # one of KINDS
    name: str | None = None   # None: every resource of the kind

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}" if self.name else self.kind


def _kind(word: str, allowed: Sequence[str]) -> str:
    kind = ALIASES.get(word.lower())
    if kind is None:
        raise TargetError(f"unknown resource type {word!r}: want {_choices(allowed)} "
                          f"(e.g. deploy/web, pod/web-3f7c, ns/default)")
    if kind not in allowed:
        raise TargetError(f"resource type {kind!r} is not supported here: want {_choices(allowed)}")
    return kind


def _choices(allowed: Sequence[str]) -> str:
    return ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]


def parse(args: Sequence[str], allowed: Sequence[str] = KINDS) -> Target:
    """``("deploy/books",)``, ``("deploy", "books")`` or ``("deploy",)`` -> a Target."""
    if not args:
        raise TargetError("no target: give a resource type, e.g. deploy or deploy/web")
    if len(args) > 2:
        raise TargetError(f"too many target arguments: {' '.join(args)}")
    first = args[0]
    if "/" in first:
        if len(args) == 2:
            raise TargetError(f"give either TYPE/NAME or TYPE NAME, not {' '.join(args)}")
        word, _, name = first.partition("/")
        if not name or "/" in name:
            raise TargetError(f"invalid target {first!r}: want TYPE/NAME, e.g. deploy/web")
        return Target(_kind(word, allowed), name)
    kind = _kind(first, allowed)
    if len(args) == 1:
        return Target(kind)
    if not args[1] or "/" in args[1]:
        raise TargetError(f"invalid resource name {args[1]!r}")
    return Target(kind, args[1])


def parse_one(text: str, allowed: Sequence[str] = KINDS) -> Target:
    """One ``TYPE/NAME`` word (``--from``/``--to``): a name is required."""
    target = parse((text,), allowed)
    if target.name is None:
        raise TargetError(f"{text!r} names no resource: want TYPE/NAME, e.g. deploy/web")
    return target


def selects(target: Target, rec: dict[str, Any], namespace: str | None) -> bool:
    """Does ``target`` (in ``namespace``; None: all) select the replica ``rec``?

    ``ns/NAME`` ignores ``namespace``; ``authority`` selects every replica (the clients)."""
    ns = rec.get("namespace")
    if target.kind == NS:
        return target.name is None or ns == target.name
    if namespace is not None and ns != namespace:
        return False
    if target.name is None or target.kind == AUTHORITY:
        return True
    if target.kind == DEPLOY:
        return rec.get("name") == target.name
    return rec.get("instance") == target.name


def select(target: Target | None, records: Iterable[dict[str, Any]],
           namespace: str | None) -> list[dict[str, Any]]:
    """The replicas a target selects; no target: every replica in ``namespace``."""
    return [r for r in records
            if (selects(target, r, namespace) if target is not None
                else namespace is None or r.get("namespace") == namespace)]
