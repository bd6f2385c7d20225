"""`mesh routes SERVICE` (Linkerd's `viz routes`) and `mesh proxy-status` (Istio's).

- routes: every running proxy's ``/routes?window=N`` (per route: effective = logical
  requests as the app saw them, actual = attempts including retries), summed per route of
  the service's authorities; SUCCESS/RPS/latencies are the effective ones, ``-o wide`` adds
  EFFECTIVE_* and ACTUAL_* so retries show. A ``[DEFAULT]`` row is always there.
- proxy-status: per proxy, for endpoints, profile and policy, the version it applied
  (from its ``/config``) against destination's current one: SYNCED (same version, or the
  same content), STALE (older content), DISCONNECTED (its watch is down or its admin does
  not answer), ``-`` (nothing to compare, e.g. destination has no /v1/profile).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click

from microproxy.metrics import BUCKETS

from . import local
from .observe import _home, _home_option, _running, _window
from .render import Column, table
from .stat import quantile

DEFAULT = "[DEFAULT]"


# === routes: pure computation ===

def _acc() -> dict[str, Any]:
    return {"requests": 0, "success": 0, "buckets": [0] * (len(BUCKETS) + 1)}


def _add(acc: dict[str, Any], row: dict[str, Any]) -> None:
    acc["requests"] += row.get("requests", 0)
    acc["success"] += row.get("success", 0)
    for i, n in enumerate(row.get("latency_ms_buckets") or ()):
        acc["buckets"][i] += n


def _matches(authority: str, service: str, namespace: str) -> bool:
    if ":" in service:
        return authority == service or authority.startswith(f"{service.split(':')[0]}.{namespace}:") \
            and authority.endswith(":" + service.split(":")[1])
    return authority.startswith((f"{service}.{namespace}:", f"{service}.{namespace}.svc"))


def route_rows(docs: Sequence[dict[str, Any]], service: str, namespace: str) -> list[dict[str, Any]]:
    """Sum /routes answers into one row per route of ``service`` (always a [DEFAULT] row)."""
    routes: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {DEFAULT: (_acc(), _acc())}
    elapsed = 0.0
    for doc in docs:
        elapsed = max(elapsed, float(doc.get("elapsed") or 0))
        for r in doc.get("routes", []):
            if not _matches(r["authority"], service, namespace):
                continue
            eff, act = routes.setdefault(r["route"], (_acc(), _acc()))
            _add(eff, r["effective"])
            _add(act, r["actual"])
    secs = max(elapsed, 1.0)
    bounds = [float(b) for b in BUCKETS]
    out = []
    for name in sorted(routes, key=lambda n: (n == DEFAULT, n)):
        eff, act = routes[name]

        def rate(a: dict[str, Any]) -> float | None:
            return a["success"] / a["requests"] if a["requests"] else None

        def pct(q: float) -> float | None:
            v = quantile(q, bounds, eff["buckets"])
            return None if v is None else round(v, 1)
        out.append({"route": name, "service": service,
                    "success": rate(eff), "rps": round(eff["requests"] / secs, 2),
                    "latency_p50": pct(0.5), "latency_p95": pct(0.95), "latency_p99": pct(0.99),
                    "effective_success": rate(eff), "effective_rps": round(eff["requests"] / secs, 2),
                    "actual_success": rate(act), "actual_rps": round(act["requests"] / secs, 2),
                    "effective_requests": eff["requests"], "actual_requests": act["requests"]})
    return out


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{v * 100:.2f}%"


def render_routes(rows: list[dict[str, Any]], wide: bool) -> str:
    cols = [Column("ROUTE", "route"), Column("SERVICE", "service"), Column("SUCCESS", "success"),
            Column("RPS", "rps"), Column("LATENCY_P50", "latency_p50"),
            Column("LATENCY_P95", "latency_p95"), Column("LATENCY_P99", "latency_p99")]
    if wide:
        cols += [Column("EFFECTIVE_SUCCESS", "effective_success"), Column("EFFECTIVE_RPS", "effective_rps"),
                 Column("ACTUAL_SUCCESS", "actual_success"), Column("ACTUAL_RPS", "actual_rps")]
    shown = []
    for r in rows:
        s = dict(r)
        for k in ("success", "effective_success", "actual_success"):
            s[k] = _pct(r[k])
        for k in ("latency_p50", "latency_p95", "latency_p99"):
            s[k] = None if r[k] is None else f"{r[k]:g}ms"
        for k in ("rps", "effective_rps", "actual_rps"):
            s[k] = f"{r[k]:.1f}"
        shown.append(s)
    return table(cols, shown)


def _fetch(records: Sequence[dict[str, Any]], path: str) -> list[tuple[dict[str, Any], Any]]:
    def one(rec: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        try:
            status, body = local.admin_get(rec["admin_port"], path, timeout=2.0)
            return rec, json.loads(body) if status == 200 else None
        except (OSError, ValueError):
            return rec, None
    if not records:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(records))) as pool:
        return list(pool.map(one, records))


@click.command(short_help="Per-route golden signals of a service, like linkerd viz routes.")
@_home_option
@click.argument("service")
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option("-t", "--window", "window_text", default="1m", show_default=True, help="e.g. 30s, 1m, 10m")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table")
@click.pass_context
def routes(ctx: click.Context, home_path: Path | None, service: str, namespace: str, window_text: str,
           output: str) -> None:
    """The routes of SERVICE as its callers' proxies see them ([DEFAULT]: requests no
    HTTPRoute rule matched). Wide: effective (what the apps saw) vs actual (attempts,
    retries included)."""
    home = _home(ctx, home_path)
    window = _window(window_text)
    docs = [d for _, d in _fetch(_running(home), f"/routes?window={window}") if d is not None]
    rows = route_rows(docs, service, namespace)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(render_routes(rows, output == "wide"), nl=False)


# === proxy-status ===

def _status(applied: Any, current: Any, connected: bool, same_content: bool = False) -> str:
    if current is None or applied is None:
        return "-"
    if not connected:
        return "DISCONNECTED"
    return "SYNCED" if applied == current or same_content else "STALE"


def _join(states: list[str]) -> str:
    for s in ("DISCONNECTED", "STALE", "SYNCED"):
        if s in states:
            return s
    return "-"


def status_row(rec: dict[str, Any], cfg: dict[str, Any] | None, current: Any) -> dict[str, Any]:
    """One proxy's row; ``current(kind, key)`` -> destination's snapshot (or None)."""
    row = {"name": rec.get("name"), "namespace": rec.get("namespace"), "instance": rec.get("instance")}
    if cfg is None:
        return {**row, "endpoints": "DISCONNECTED", "profile": "DISCONNECTED", "policy": "DISCONNECTED",
                "versions": "-"}
    eps, profs, versions = [], [], []
    for auth, r in (cfg.get("resolutions") or {}).items():
        cur = current("endpoints", (auth, rec.get("namespace")))
        same = cur is not None and sorted(e["address"] for e in r.get("endpoints", [])) == \
            sorted(e["address"] for e in cur.get("endpoints") or [])
        eps.append(_status(r.get("version"), cur and cur.get("version"), bool(r.get("connected")), same))
        versions.append(f"{auth}={r.get('version')}")
    for auth, p in (cfg.get("profiles") or {}).items():
        cur = current("profile", (auth, rec.get("namespace")))
        profs.append(_status(p.get("version"), cur and cur.get("version"), bool(p.get("connected"))))
    pol = cfg.get("policy") or {}
    pol_state = "-"
    if rec.get("app_port"):
        port = pol.get("port")
        cur = current("policy", (rec.get("name"), rec.get("namespace"), port))
        same = cur is not None and sorted(p.get("name") for p in pol.get("policies", [])) == \
            sorted(p.get("name") for p in cur.get("policies") or [])
        pol_state = _status(pol.get("version"), cur and cur.get("version"), bool(pol.get("connected")), same)
    return {**row, "endpoints": _join(eps), "profile": _join(profs), "policy": pol_state,
            "versions": ",".join(versions) or "-"}


STATUS_COLUMNS = (Column("NAME", "name"), Column("NAMESPACE", "namespace"), Column("INSTANCE", "instance"),
                  Column("ENDPOINTS", "endpoints"), Column("PROFILE", "profile"), Column("POLICY", "policy"))


@click.command("proxy-status", short_help="Each proxy's applied config versions vs destination's.")
@_home_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def proxy_status(ctx: click.Context, home_path: Path | None, output: str) -> None:
    """For every running proxy: endpoints, profile (routes) and policy it applied versus
    destination's current version: SYNCED, STALE or DISCONNECTED (like istioctl proxy-status)."""
    from .resources import Destination
    home = _home(ctx, home_path)
    records = [r for r in local.list_workloads(home, probe=False) if r.get("alive")]
    fetched = _fetch([r for r in records if r.get("admin_port")], "/config")
    dest = Destination(home)
    calls: list[tuple[str, Any]] = []
    for rec, cfg in fetched:
        if cfg is None:
            continue
        ns = rec.get("namespace") or "default"
        for auth in cfg.get("resolutions") or {}:
            calls.append(("endpoints", (auth, ns)))
        for auth in cfg.get("profiles") or {}:
            calls.append(("profile", (auth, ns)))
        if rec.get("app_port"):
            calls.append(("policy", (rec.get("name"), rec.get("namespace"), (cfg.get("policy") or {}).get("port"))))
    calls = list(dict.fromkeys(calls))
    paths = []
    for kind, key in calls:
        if kind in ("endpoints", "profile"):
            paths.append(f"/v1/{kind}?authority={quote(key[0], safe=':')}&namespace={quote(key[1])}")
        else:
            name, ns, port = key
            paths.append(f"/v1/policy?workload={quote(name)}&namespace={quote(ns)}"
                         + (f"&port={port}" if port else ""))
    answers = dest.run([("GET", p, None) for p in paths]) if paths else []
    snaps = {c: (data if status == 200 else None) for c, (status, data) in zip(calls, answers)}
    rows = [status_row(rec, cfg, lambda kind, key: snaps.get((kind, key))) for rec, cfg in fetched]
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(table(STATUS_COLUMNS, rows), nl=False)


def register(group: click.Group) -> None:
    group.add_command(routes)
    group.add_command(proxy_status)
