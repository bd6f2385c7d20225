"""`mesh stat`: golden signals (success, RPS, latency, TCP) per deploy, pod, ns or authority.

Theory of operation
-------------------
Every proxy keeps rolling per-second windows of what it served (inbound) and what it sent
(outbound), with latency histograms, and serves them at ``GET /stats?window=S`` on its
admin port. So an answer needs no Prometheus and no waiting:

1. fetch:   ask every selected proxy at once, with a short timeout (a dead proxy is
            skipped with a note); the only function here that does I/O.
2. parse:   JSON -> ``ProxyStats``; a peer identity (``SA.NS.serviceaccount...``) is mapped
            to its workload through the workload list.
3. compute: pick the traffic rows the query is about (the target's inbound rows; with
            ``--from X`` those whose client is X; with ``--to Y`` its outbound rows toward
            Y; for ``authority`` the outbound rows grouped by authority) and merge them per
            resource into ``StatRow``s.
4. render:  Linkerd's table (``viz/cmd/stat.go``) or its JSON, in ``cli/stat_render.py``.

Merging: counts add; rates add per proxy (``requests_i / elapsed_i``: each proxy covered
its own ``elapsed``, which is shorter than the window while it is young); latency
percentiles come from the *merged* histogram (bucket counts summed over rows and proxies)
with Prometheus' ``histogram_quantile`` interpolation, never from averaging percentiles.
"""
from __future__ import annotations

import http.client
import json
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import local
from .targets import AUTHORITY, DEPLOY, NS, POD, Target, TargetError

FETCH_TIMEOUT = 0.5         # seconds per admin request; a slower proxy is skipped
MAX_WINDOW = 600            # seconds: what the proxies keep


# === window ===

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_window(text: str) -> int:
    """``10s``, ``1m``, ``1m30s``, ``5m`` -> whole seconds in 1..600 (a bare number is seconds)."""
    t = text.strip().lower()
    if t.isdigit():
        seconds = float(t)
    else:
        pos, seconds = 0, 0.0
        for m in _DURATION.finditer(t):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise ValueError(f"invalid time window {text!r}: want e.g. 10s, 1m, 5m")
    if not 1 <= seconds <= MAX_WINDOW:
        raise ValueError(f"time window {text!r} is out of range: want 1s to {MAX_WINDOW // 60}m")
    return int(seconds)


# === the proxies' answers ===

@dataclass(frozen=True, slots=True)
class Traffic:
    """One inbound or outbound row of a proxy's /stats."""
    direction: str                  # "inbound" | "outbound"
    authority: str
    peer_workload: str | None       # inbound: the client's workload; outbound: dst_workload
    peer_namespace: str | None
    peer_id: str | None             # inbound: client_id; outbound: server_id
    tls: bool
    requests: int
    success: int
    failure: int
    buckets: tuple[int, ...]        # per-bucket counts (not cumulative), last one is +Inf
    peer_pod: str | None = None     # outbound: dst_pod (the replica that answered)


@dataclass(frozen=True, slots=True)
class Tcp:
    open: int = 0
    read_bytes: int = 0             # within the window
    write_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ProxyStats:
    workload: str
    namespace: str
    pod: str
    identity: str | None
    elapsed: float                  # seconds the numbers cover: min(window, uptime)
    bounds: tuple[float, ...]       # histogram upper bounds (ms), without +Inf
    inbound: tuple[Traffic, ...] = ()
    outbound: tuple[Traffic, ...] = ()
    tcp_in: Tcp = Tcp()
    tcp_out: Tcp = Tcp()


PeerOf = Callable[[str | None], tuple[str | None, str | None]]


def peer_lookup(records: Iterable[dict[str, Any]]) -> PeerOf:
    """identity -> (workload, namespace): from the workload list, else read off the name
    ``SA.NS.serviceaccount.identity.<domain>`` (the service account is the workload by default)."""
    known = {r["identity"]: (r.get("name"), r.get("namespace")) for r in records if r.get("identity")}

    def peer_of(identity: str | None) -> tuple[str | None, str | None]:
        if not identity:
            return None, None
        if identity in known:
            return known[identity]
        parts = identity.split(".")
        if len(parts) >= 3 and parts[2] == "serviceaccount":
            return parts[0], parts[1]
        return None, None
    return peer_of


def _counts(row: dict[str, Any], n: int) -> tuple[int, ...]:
    counts = [int(c) for c in row.get("latency_ms_buckets") or ()]
    return tuple(counts[:n] + [0] * (n - len(counts)))


def _tcp(doc: Any) -> Tcp:
    doc = doc if isinstance(doc, dict) else {}
    return Tcp(int(doc.get("open") or 0), int(doc.get("read_bytes") or 0), int(doc.get("write_bytes") or 0))


def parse_stats(doc: dict[str, Any], peer_of: PeerOf) -> ProxyStats:
    """A proxy's /stats JSON -> ProxyStats. Raises ValueError/KeyError/TypeError if malformed."""
    bounds = tuple(float(b) for b in doc["buckets_ms"])
    n = len(bounds) + 1
    inbound = []
    for r in doc.get("inbound") or ():
        wl, ns = peer_of(r.get("client_id"))
        inbound.append(Traffic("inbound", str(r.get("authority") or ""), wl, ns, r.get("client_id"),
                               bool(r.get("tls")), int(r.get("requests") or 0), int(r.get("success") or 0),
                               int(r.get("failure") or 0), _counts(r, n)))
    outbound = []
    for r in doc.get("outbound") or ():
        wl, ns = r.get("dst_workload"), r.get("dst_namespace")
        if wl is None:
            wl, ns = peer_of(r.get("server_id"))
        outbound.append(Traffic("outbound", str(r.get("authority") or ""), wl, ns, r.get("server_id"),
                                bool(r.get("tls")), int(r.get("requests") or 0), int(r.get("success") or 0),
                                int(r.get("failure") or 0), _counts(r, n), r.get("dst_pod")))
    tcp = doc.get("tcp") or {}
    return ProxyStats(workload=str(doc["workload"]), namespace=str(doc["namespace"]), pod=str(doc["pod"]),
                      identity=doc.get("identity"), elapsed=float(doc.get("elapsed") or 0.0), bounds=bounds,
                      inbound=tuple(inbound), outbound=tuple(outbound),
                      tcp_in=_tcp(tcp.get("inbound")), tcp_out=_tcp(tcp.get("outbound")))


# === percentiles ===

def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """Prometheus' ``histogram_quantile`` over per-bucket ``counts`` (the last is +Inf).

    Linear interpolation inside the bucket holding rank ``q * total`` (the first bucket
    starts at 0); a rank in the +Inf bucket answers the highest finite bound. None: no data.
    """
    total = sum(counts)
    if total == 0 or not bounds:
        return None
    rank = q * total
    cum = 0
    for i, upper in enumerate(bounds):
        if cum + counts[i] >= rank and counts[i] > 0:
            lower = bounds[i - 1] if i > 0 else 0.0
            if i == 0 and upper <= 0:
                return upper
            return lower + (upper - lower) * (rank - cum) / counts[i]
        cum += counts[i]
    return bounds[-1]


# === compute ===

@dataclass(frozen=True, slots=True)
class StatQuery:
    target: Target
    namespace: str | None = "default"      # None: all namespaces (-A)
    from_: Target | None = None
    to: Target | None = None

    def validate(self) -> None:
        if self.from_ is not None and self.to is not None:
            raise TargetError("--to and --from flags are mutually exclusive")
        if self.from_ is not None and self.from_.kind == POD:
            raise TargetError(f"--from {self.from_} is not supported: clients are known by their "
                              f"identity, i.e. by workload (use --from deploy/NAME)")
        if self.from_ is not None and self.from_.kind == AUTHORITY:
            raise TargetError("--from authority/... is not supported: an authority is a destination")
        if self.target.kind == AUTHORITY and self.to is not None:
            raise TargetError("--to is not supported with the authority resource type")


@dataclass(frozen=True, slots=True)
class Replica:
    name: str
    namespace: str
    instance: str
    ready: bool


@dataclass(frozen=True, slots=True)
class StatRow:
    namespace: str
    kind: str                       # deploy | pod | ns | authority
    name: str
    meshed: str                     # "2/2"; "-" for authorities
    status: str | None = None       # pods: Running | NotReady
    requests: float = 0
    success: float = 0
    failure: float = 0
    rps: float = 0.0
    p50: float | None = None        # milliseconds
    p95: float | None = None
    p99: float | None = None
    tcp_conn: int | None = None
    read_rate: float | None = None  # bytes per second
    write_rate: float | None = None

    @property
    def has_data(self) -> bool:
        return self.success + self.failure > 0 or self.requests > 0

    @property
    def success_rate(self) -> float | None:
        done = self.success + self.failure
        return self.success / done if done else None


@dataclass(slots=True)
class _Acc:
    requests: int = 0
    success: int = 0
    failure: int = 0
    rps: float = 0.0
    buckets: list[int] = field(default_factory=list)
    tcp_conn: int | None = None
    read_rate: float | None = None
    write_rate: float | None = None

    def add(self, t: Traffic, elapsed: float) -> None:
        self.requests += t.requests
        self.success += t.success
        self.failure += t.failure
        if elapsed > 0:
            self.rps += t.requests / elapsed
        if len(self.buckets) < len(t.buckets):
            self.buckets += [0] * (len(t.buckets) - len(self.buckets))
        for i, c in enumerate(t.buckets):
            self.buckets[i] += c

    def add_tcp(self, tcp: Tcp, elapsed: float) -> None:
        self.tcp_conn = (self.tcp_conn or 0) + tcp.open
        rate = 1.0 / elapsed if elapsed > 0 else 0.0
        self.read_rate = (self.read_rate or 0.0) + tcp.read_bytes * rate
        self.write_rate = (self.write_rate or 0.0) + tcp.write_bytes * rate


def _peer_matches(t: Traffic, peer: Target, namespace: str | None) -> bool:
    if peer.kind == NS:
        return t.peer_namespace == peer.name
    if peer.kind == AUTHORITY:
        return t.authority == peer.name
    if peer.kind == POD:
        return t.peer_pod == peer.name
    return t.peer_workload == peer.name and (namespace is None or t.peer_namespace == namespace)


def _rows_of(query: StatQuery, p: ProxyStats) -> Iterable[Traffic]:
    if query.to is not None:
        return (t for t in p.outbound if _peer_matches(t, query.to, query.namespace))
    if query.from_ is not None:
        return (t for t in p.inbound if _peer_matches(t, query.from_, query.namespace))
    return p.inbound


def _group_key(kind: str, namespace: str, workload: str, pod: str) -> tuple[str, str]:
    return (namespace, {DEPLOY: workload, POD: pod, NS: namespace}[kind])


def _finish(acc: _Acc, bounds: Sequence[float], **kw: Any) -> StatRow:
    def q(at: float) -> float | None:
        return quantile(at, bounds, acc.buckets) if acc.buckets else None
    return StatRow(requests=acc.requests, success=acc.success, failure=acc.failure, rps=acc.rps,
                   p50=q(0.5), p95=q(0.95), p99=q(0.99), tcp_conn=acc.tcp_conn,
                   read_rate=acc.read_rate, write_rate=acc.write_rate, **kw)


def compute(query: StatQuery, replicas: Sequence[Replica], stats: Sequence[ProxyStats]) -> list[StatRow]:
    """Merge the proxies' rows into one StatRow per resource, sorted by namespace/name.

    ``replicas`` are the selected replicas (they make the rows and MESHED, even without
    traffic); ``stats`` what their proxies answered."""
    bounds = next((p.bounds for p in stats), ())
    kind = query.target.kind
    if kind == AUTHORITY:
        accs: dict[tuple[str, str], _Acc] = {}
        for p in stats:
            for t in p.outbound:
                if query.target.name is None or t.authority == query.target.name:
                    accs.setdefault((p.namespace, t.authority), _Acc()).add(t, p.elapsed)
        return [_finish(acc, bounds, namespace=ns, kind=kind, name=name, meshed="-")
                for (ns, name), acc in sorted(accs.items())]
    groups: dict[tuple[str, str], list[Replica]] = {}
    for r in replicas:
        groups.setdefault(_group_key(kind, r.namespace, r.name, r.instance), []).append(r)
    accs = {key: _Acc() for key in groups}
    plain = query.from_ is None and query.to is None
    for p in stats:
        acc = accs.get(_group_key(kind, p.namespace, p.workload, p.pod))
        if acc is None:
            continue
        for t in _rows_of(query, p):
            acc.add(t, p.elapsed)
        if plain:
            acc.add_tcp(p.tcp_in, p.elapsed)
    rows = []
    for (ns, name), members in sorted(groups.items()):
        ready = sum(1 for m in members if m.ready)
        status = None
        if kind == POD:
            status = "Running" if ready else "NotReady"
        rows.append(_finish(accs[(ns, name)], bounds, namespace=ns, kind=kind, name=name,
                            meshed=f"{ready}/{len(members)}", status=status))
    return rows


# === fetch (the only I/O) ===

@dataclass(frozen=True, slots=True)
class Fetched:
    stats: list[ProxyStats]
    ready: dict[str, bool]          # instance -> its proxy answered /ready with 200
    notes: list[str]                # one line per proxy that was skipped


def _get_json(port: int, path: str, timeout: float) -> Any:
    status, body = local.admin_get(port, path, timeout=timeout)
    if status != 200:
        raise ValueError(f"{path.split('?')[0]} answered {status}")
    return json.loads(body)


def _fetch_one(rec: dict[str, Any], window: int, timeout: float,
               peer_of: PeerOf) -> tuple[ProxyStats | None, bool, str | None]:
    port = rec.get("admin_port")
    where = f"{rec.get('instance')} (admin 127.0.0.1:{port})"
    if not port:
        return None, False, f"{rec.get('instance')}: no admin port; skipped"
    try:
        status, _ = local.admin_get(port, "/ready", timeout=timeout)
        ready = status == 200
        stats = parse_stats(_get_json(port, f"/stats?window={window}", timeout), peer_of)
    except (OSError, http.client.HTTPException) as e:
        return None, False, f"{where}: {e or type(e).__name__}; skipped"
    except (ValueError, KeyError, TypeError) as e:
        return None, False, f"{where}: bad /stats answer ({e}); skipped"
    return stats, ready, None


def fetch(records: Sequence[dict[str, Any]], window: int, peer_of: PeerOf,
          timeout: float = FETCH_TIMEOUT) -> Fetched:
    """Ask every replica's proxy for /ready and /stats at once."""
    if not records:
        return Fetched([], {}, [])
    with ThreadPoolExecutor(max_workers=min(32, len(records))) as pool:
        answers = list(pool.map(lambda r: _fetch_one(r, window, timeout, peer_of), records))
    stats, ready, notes = [], {}, []
    for rec, (st, ok, note) in zip(records, answers):
        ready[rec["instance"]] = ok
        if st is not None:
            stats.append(st)
        if note:
            notes.append(note)
    return Fetched(stats, ready, notes)


def replicas(records: Sequence[dict[str, Any]], ready: dict[str, bool]) -> list[Replica]:
    return [Replica(r["name"], r["namespace"], r["instance"], ready.get(r["instance"], False))
            for r in records]
