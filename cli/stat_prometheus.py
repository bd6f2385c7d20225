"""`mesh stat --prometheus URL`: the same rows as `mesh stat`, computed by Prometheus.

For meshes too big to ask every proxy, Prometheus scrapes the proxies' /metrics and the
CLI asks it what Linkerd's metrics API asks (``viz/metrics-api``):

    sum(increase(response_total{direction="inbound",namespace="default"}[60s])) by (namespace, workload, classification)
    histogram_quantile(0.95, sum(increase(response_latency_ms_bucket{...}[60s])) by (le, namespace, workload))
    sum(tcp_open_connections{direction="inbound",...}) by (namespace, workload)
    sum(increase(tcp_read_bytes_total{...}[60s])) by (namespace, workload)       (and write)
    count(count(identity_cert_expiration_timestamp_seconds{...}) by (namespace, workload, instance)) by (namespace, workload)

RPS is (success + failure) / window, as in Linkerd. MESHED is n/n where n counts the
proxies Prometheus scrapes for the resource (Prometheus does not know readiness). A pod is
the ``pod`` label if the scrape config adds one, else the scrape ``instance``
(``127.0.0.1:<admin port>``) mapped to its replica through the workload list.

``build_queries``, ``parse_vector`` and ``rows`` are pure; ``fetch`` does the HTTP.
"""
from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode

from .stat import StatQuery, StatRow
from .targets import AUTHORITY, DEPLOY, NS, POD

Vector = list[tuple[dict[str, str], float]]
IdentityOf = Callable[[str, str], str]        # (workload, namespace) -> identity
QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
GROUPS = {DEPLOY: ("namespace", "workload"), POD: ("namespace", "workload", "pod", "instance"),
          NS: ("namespace",), AUTHORITY: ("namespace", "authority")}


class PrometheusError(Exception):
    """Prometheus could not answer (one line)."""


def _q(value: str) -> str:
    return json.dumps(value)   # a PromQL string literal: double quotes, backslash escapes


def _matchers(pairs: Sequence[tuple[str, str, str]]) -> str:
    return ",".join(f"{k}{op}{_q(v)}" for k, op, v in pairs)


def _selectors(query: StatQuery, identity_of: IdentityOf) -> tuple[str, str, str]:
    """(HTTP selector, TCP selector, proxy selector) as label matchers without braces."""
    t = query.target
    outbound = query.to is not None or t.kind == AUTHORITY
    base: list[tuple[str, str, str]] = []
    if t.kind == NS:
        if t.name:
            base.append(("namespace", "=", t.name))
    elif query.namespace is not None:
        base.append(("namespace", "=", query.namespace))
    if t.kind == DEPLOY and t.name:
        base.append(("workload", "=", t.name))
    http = [("direction", "=", "outbound" if outbound else "inbound")] + base
    if t.kind == AUTHORITY and t.name:
        http.append(("authority", "=", t.name))
    f = query.from_
    if f is not None and f.name:
        if t.kind == AUTHORITY:   # the clients are the reporting proxies themselves
            http.append(("workload", "=", f.name) if f.kind == DEPLOY else ("namespace", "=", f.name))
        elif f.kind == DEPLOY:
            http.append(("client_id", "=", identity_of(f.name, query.namespace or "default")))
        else:
            http.append(("client_id", "=~", rf"[^.]+\.{f.name}\.serviceaccount\..+"))
    to = query.to
    if to is not None and to.name:
        label = {DEPLOY: "dst_workload", NS: "dst_namespace", AUTHORITY: "authority", POD: "dst_pod"}[to.kind]
        http.append((label, "=", to.name))
        if to.kind == DEPLOY and query.namespace is not None:
            http.append(("dst_namespace", "=", query.namespace))
    tcp = [("direction", "=", "inbound")] + base
    return _matchers(http), _matchers(tcp), _matchers(base)


def build_queries(query: StatQuery, window: int, identity_of: IdentityOf) -> dict[str, str]:
    """PromQL per quantity: responses, p50/p95/p99 and, where Linkerd shows them, tcp_* and meshed."""
    kind = query.target.kind
    group = ", ".join(GROUPS[kind])
    http, tcp, proxies = _selectors(query, identity_of)
    rng = f"[{window}s]"
    out = {"responses": f"sum(increase(response_total{{{http}}}{rng})) by ({group}, classification)"}
    for name, q in QUANTILES:
        out[name] = (f"histogram_quantile({q}, sum(increase(response_latency_ms_bucket{{{http}}}{rng}))"
                     f" by (le, {group}))")
    if kind != AUTHORITY:
        with_instance = group if "instance" in group else f"{group}, instance"
        out["meshed"] = (f"count(count(identity_cert_expiration_timestamp_seconds{{{proxies}}}) "
                         f"by ({with_instance})) by ({group})")
        if query.from_ is None and query.to is None:
            out["tcp_open"] = f"sum(tcp_open_connections{{{tcp}}}) by ({group})"
            out["tcp_read"] = f"sum(increase(tcp_read_bytes_total{{{tcp}}}{rng})) by ({group})"
            out["tcp_write"] = f"sum(increase(tcp_write_bytes_total{{{tcp}}}{rng})) by ({group})"
    return out


def parse_vector(doc: Any) -> Vector:
    """A ``/api/v1/query`` answer -> [(labels, value)]. Raises PrometheusError on an error answer."""
    if not isinstance(doc, dict) or doc.get("status") != "success":
        err = doc.get("error") if isinstance(doc, dict) else None
        raise PrometheusError(f"query failed: {err or doc!r}")
    data = doc.get("data") or {}
    if data.get("resultType") != "vector":
        raise PrometheusError(f"expected a vector, got {data.get('resultType')!r}")
    out: Vector = []
    for item in data.get("result") or ():
        out.append(({str(k): str(v) for k, v in (item.get("metric") or {}).items()},
                    float(item["value"][1])))
    return out


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v


def rows(query: StatQuery, results: Mapping[str, Vector], window: int,
         pod_of_instance: Mapping[str, str] | None = None) -> list[StatRow]:
    """Prometheus' vectors -> StatRows (one per resource), sorted by namespace/name."""
    kind = query.target.kind
    labels = GROUPS[kind]
    pods = pod_of_instance or {}

    def name_of(m: Mapping[str, str]) -> tuple[str, str]:
        ns = m.get("namespace", "")
        if kind == DEPLOY:
            return ns, m.get("workload", "")
        if kind == POD:
            return ns, m.get("pod") or pods.get(m.get("instance", ""), m.get("instance", ""))
        if kind == NS:
            return ns, ns
        return ns, m.get("authority", "")

    acc: dict[tuple[str, str], dict[str, Any]] = {}

    def slot(m: Mapping[str, str]) -> dict[str, Any]:
        return acc.setdefault(name_of({k: m.get(k, "") for k in labels}), {"success": 0.0, "failure": 0.0})

    for m, v in results.get("responses", ()):
        s = slot(m)
        cls = "failure" if m.get("classification") == "failure" else "success"
        s[cls] += 0.0 if math.isnan(v) else v
    for key in ("p50", "p95", "p99", "tcp_open", "tcp_read", "tcp_write", "meshed"):
        for m, v in results.get(key, ()):
            s = slot(m)
            s[key] = (s.get(key) or 0.0) + v if key.startswith("tcp_") or key == "meshed" else v
    out = []
    for (ns, name), s in sorted(acc.items()):
        if query.target.name and kind in (POD, AUTHORITY) and name != query.target.name:
            continue
        done = s["success"] + s["failure"]
        meshed = s.get("meshed")
        tcp = "tcp_open" in results and kind != AUTHORITY
        out.append(StatRow(
            namespace=ns, kind=kind, name=name,
            meshed="-" if kind == AUTHORITY else f"{int(meshed or 0)}/{int(meshed or 0)}",
            status=("Running" if meshed else "NotReady") if kind == POD else None,
            requests=done, success=s["success"], failure=s["failure"], rps=done / window,
            p50=_num(s.get("p50")), p95=_num(s.get("p95")), p99=_num(s.get("p99")),
            tcp_conn=int(s.get("tcp_open") or 0) if tcp else None,
            read_rate=(s.get("tcp_read") or 0.0) / window if tcp else None,
            write_rate=(s.get("tcp_write") or 0.0) / window if tcp else None))
    return out


def fetch(url: str, queries: Mapping[str, str], timeout: float = 5.0) -> dict[str, Vector]:
    """Run every query at once against ``url`` (``http://host:9090``); never via an HTTP proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = url.rstrip("/") + "/api/v1/query?"

    def one(q: str) -> Vector:
        try:
            with opener.open(base + urlencode({"query": q}), timeout=timeout) as resp:
                return parse_vector(json.loads(resp.read()))
        except urllib.error.HTTPError as e:
            try:
                doc = json.loads(e.read())
            except ValueError:
                doc = {"error": f"HTTP {e.code}"}
            finally:
                e.close()
            return parse_vector(doc)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise PrometheusError(f"cannot query Prometheus at {url}: {reason}") from None

    with ThreadPoolExecutor(max_workers=len(queries) or 1) as pool:
        answers = dict(zip(queries, pool.map(one, queries.values())))
    return answers
