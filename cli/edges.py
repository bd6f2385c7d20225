"""`mesh edges`: who talks to whom, and whether the connection is mTLS, like `linkerd viz edges`.

An edge comes from a proxy's outbound rows (its workload called ``dst_workload``, as
``server_id``, over TLS or not) and, for clients whose own proxy did not report the call
(an unmeshed client, or a proxy that was skipped), from the server's inbound rows (the
client is known by its ``client_id``, or not at all). Only traffic within the window
counts. Pure apart from what ``stat.fetch`` brings in.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .stat import ProxyStats
from .stat_render import tabulate

UNMESHED = "unmeshed"
NO_TLS_REASON = "no_tls_from_remote"


@dataclass(frozen=True, slots=True)
class Edge:
    src: str
    dst: str
    src_ns: str
    dst_ns: str
    client_id: str
    server_id: str
    secured: bool

    @property
    def sort_key(self) -> str:   # linkerd: SRC_NS + DST_NS + SRC + DST
        return self.src_ns + self.dst_ns + self.src + self.dst


def short_id(identity: str | None) -> str:
    """``web.default.serviceaccount.identity.cluster.local`` -> ``web.default`` (as Linkerd shows it)."""
    if not identity:
        return ""
    parts = identity.split(".")
    return ".".join(parts[:2])


def edges(stats: Sequence[ProxyStats], namespace: str | None = None) -> list[Edge]:
    """The edges seen by ``stats``, touching ``namespace`` (None: all), sorted as Linkerd does."""
    found: dict[tuple[str, str, str, str], Edge] = {}

    def add(e: Edge) -> None:
        key = (e.src, e.src_ns, e.dst, e.dst_ns)
        old = found.get(key)
        if old is None:
            found[key] = e
        elif old.secured and not e.secured:
            found[key] = e   # one plaintext call makes the edge insecure
    for p in stats:
        for t in p.outbound:
            if t.requests:
                add(Edge(p.workload, t.peer_workload or t.authority, p.namespace, t.peer_namespace or "",
                         short_id(p.identity), short_id(t.peer_id), t.tls))
    reported = {(e.src, e.src_ns, e.dst, e.dst_ns) for e in found.values()}
    for p in stats:
        for t in p.inbound:
            if not t.requests:
                continue
            src, src_ns = (t.peer_workload, t.peer_namespace or "") if t.peer_workload else (UNMESHED, "")
            if (src, src_ns, p.workload, p.namespace) in reported:
                continue
            add(Edge(src, p.workload, src_ns, p.namespace, short_id(t.peer_id), short_id(p.identity),
                     t.tls and bool(t.peer_id)))
    out = [e for e in found.values() if namespace is None or namespace in (e.src_ns, e.dst_ns)]
    return sorted(out, key=lambda e: e.sort_key)


def render_table(rows: Sequence[Edge], wide: bool = False) -> str:
    header = ["SRC", "DST", "SRC_NS", "DST_NS"] + (["CLIENT_ID", "SERVER_ID"] if wide else []) + ["SECURED"]
    lines = [header]
    for e in rows:
        line = [e.src, e.dst, e.src_ns or "-", e.dst_ns or "-"]
        if wide:
            line += [e.client_id or "-", e.server_id or "-"]
        lines.append(line + ["√" if e.secured else "×"])
    return tabulate(lines, left=len(header))


def json_rows(rows: Sequence[Edge]) -> list[dict[str, Any]]:
    return [{"src": e.src, "src_namespace": e.src_ns, "dst": e.dst, "dst_namespace": e.dst_ns,
             "client_id": e.client_id, "server_id": e.server_id,
             "no_tls_reason": "" if e.secured else NO_TLS_REASON} for e in rows]


def render_json(rows: Sequence[Edge]) -> str:
    return json.dumps(json_rows(rows), indent=2) + "\n"
