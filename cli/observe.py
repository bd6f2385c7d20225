"""The observability commands: `mesh stat`, `top`, `tap`, `edges`, `diagnostics proxy-metrics`.

Flags in, a fetch/compute/render module called, text out (cli/stat.py, top.py, tap.py,
edges.py, diagnostics.py). A bad target or flag is a one-line usage error (exit 2); a
target that names nothing, or an unreachable Prometheus, a one-line error (exit 1).
`register(cli)` adds the commands to the `mesh` group.
"""
from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from identity import ca
from identity.store import MeshHome

from .options import home_of, home_option
from . import diagnostics as diag
from . import edges as edges_mod
from . import local, stat_prometheus, stat_render, targets
from . import stat as stat_mod
from . import tap as tap_mod
from . import top as top_mod
from .targets import AUTHORITY, DEPLOY, NS, POD, Target, TargetError

F = TypeVar("F", bound=Callable[..., Any])


_home_option = home_option   # shared with every verb (cli/options.py)
_home = home_of


def _note(text: str) -> None:
    click.echo(f"mesh: {text}", err=True)


def _running(home: MeshHome) -> list[dict[str, Any]]:
    return [r for r in local.list_workloads(home, probe=False) if r.get("alive") and r.get("admin_port")]


def _namespace(namespace: str | None, all_namespaces: bool) -> str | None:
    if all_namespaces and namespace is not None:
        raise click.UsageError("--all-namespaces and --namespace flags are mutually exclusive")
    return None if all_namespaces else (namespace or "default")


def _where(namespace: str | None) -> str:
    return "in any namespace" if namespace is None else f"in namespace {namespace}"


def _target(args: tuple[str, ...], allowed: tuple[str, ...], default: str | None) -> Target | None:
    try:
        return targets.parse(args, allowed) if args else (Target(default) if default else None)
    except TargetError as e:
        raise click.UsageError(str(e)) from None


def _window(text: str) -> int:
    try:
        return stat_mod.parse_window(text)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'-t' / '--time-window'") from None


_NS_OPTIONS = (
    click.option("-n", "--namespace", default=None, help="Namespace of the resources [default: default]."),
    click.option("-A", "--all-namespaces", is_flag=True, help="Resources in every namespace."),
)


def _ns_options(f: F) -> F:
    for opt in reversed(_NS_OPTIONS):
        f = opt(f)
    return f


# === stat ===

def _identity_of(records: list[dict[str, Any]]) -> Callable[[str, str], str]:
    known = {(r["name"], r["namespace"]): r["identity"] for r in records if r.get("identity")}
    return lambda name, ns: known.get((name, ns)) or ca.identity_name(name, ns, local.TRUST_DOMAIN)


@click.command(short_help="Golden signals per deploy, pod, namespace or authority.")
@_home_option
@click.argument("resource", nargs=-1, metavar="[TYPE[/NAME] | TYPE NAME]")
@_ns_options
@click.option("-t", "--time-window", "window", default="1m", show_default=True,
              help="Window of the statistics, e.g. 10s, 1m, 5m (at most 10m).")
@click.option("--from", "from_", default=None, metavar="TYPE/NAME",
              help="Only requests from this client, e.g. deploy/web.")
@click.option("--to", default=None, metavar="TYPE/NAME",
              help="Only requests the resource sent to this destination, e.g. deploy/authors.")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table",
              show_default=True, help="Output format; wide adds read/write bytes per second.")
@click.option("--prometheus", "prometheus_url", default=None, metavar="URL",
              help="Compute the table from this Prometheus (http://HOST:PORT) instead of the proxies.")
@click.pass_context
def stat(ctx: click.Context, home_path: Path | None, resource: tuple[str, ...], namespace: str | None,
         all_namespaces: bool, window: str, from_: str | None, to: str | None, output: str,
         prometheus_url: str | None) -> None:
    """Success rate, requests per second, latency percentiles and TCP connections per
    resource, like `linkerd viz stat`. TYPE is deploy (default), pod, ns or authority.

    \b
    mesh stat deploy                    every workload in the namespace
    mesh stat deploy/books --from deploy/web
    mesh stat deploy/web --to deploy/authors -t 5m
    mesh stat pod -A -o wide
    """
    home = _home(ctx, home_path)
    target = _target(resource, targets.KINDS, DEPLOY)
    assert target is not None
    seconds = _window(window)
    ns = _namespace(namespace, all_namespaces)
    try:
        query = stat_mod.StatQuery(target, ns, targets.parse_one(from_) if from_ else None,
                                   targets.parse_one(to) if to else None)
        query.validate()
    except TargetError as e:
        raise click.UsageError(str(e)) from None
    records = _running(home)
    if target.kind == AUTHORITY:
        selected = targets.select(None, records, ns)
        if query.from_ is not None:
            selected = [r for r in selected if targets.selects(query.from_, r, ns)]
    else:
        selected = targets.select(target, records, ns)
        if target.name and not selected and prometheus_url is None:
            raise click.ClickException(f"no running {target} {_where(None if target.kind == NS else ns)}")
    if prometheus_url is not None:
        queries = stat_prometheus.build_queries(query, seconds, _identity_of(records))
        try:
            results = stat_prometheus.fetch(prometheus_url, queries)
        except stat_prometheus.PrometheusError as e:
            raise click.ClickException(str(e)) from None
        pods = {f"127.0.0.1:{r['admin_port']}": r["instance"] for r in records}
        rows = stat_prometheus.rows(query, results, seconds, pods)
    else:
        fetched = stat_mod.fetch(selected, seconds, stat_mod.peer_lookup(records))
        for note in fetched.notes:
            _note(note)
        rows = stat_mod.compute(query, stat_mod.replicas(selected, fetched.ready), fetched.stats)
    if output == "json":
        click.echo(stat_render.render_json(rows), nl=False)
    elif not rows:
        click.echo("No traffic found.", err=True)
    else:
        click.echo(stat_render.render_table(rows, target.kind, wide=output == "wide",
                                         all_namespaces=ns is None and target.kind != NS), nl=False)


# === tap / top ===

_TAP_OPTIONS = (
    click.option("--max-rps", type=click.FloatRange(min=0.1), default=tap_mod.DEFAULT_MAX_RPS,
                 show_default=True, help="Most requests per second to tap, per proxy."),
    click.option("--method", default=None, help="Only requests with this HTTP method."),
    click.option("--path", default=None, help="Only requests whose path starts with this prefix."),
    click.option("--authority", default=None, help="Only requests with this :authority."),
    click.option("--duration", type=click.FloatRange(min=0), default=None, hidden=True,
                 help="Stop after this many seconds (for tests and scripts)."),
)


def _tap_options(f: F) -> F:
    for opt in reversed(_TAP_OPTIONS):
        f = opt(f)
    return f


def _tapped(home: MeshHome, resource: tuple[str, ...], ns: str | None) -> tuple[str, list[dict[str, Any]]]:
    target = _target(resource, (DEPLOY, POD, NS), None)
    records = targets.select(target, _running(home), None if target is not None and target.kind == NS else ns)
    label = str(target) if target is not None else ("all namespaces" if ns is None else f"ns/{ns}")
    if not records:
        raise click.ClickException(f"nothing to tap: no running workload matches {label}"
                                   + ("" if target is None or target.kind == NS else f" {_where(ns)}"))
    return label, records


def _run(coro: Any) -> Any:
    """asyncio.run, with Ctrl-C as a clean end (the coroutine's finally blocks have run)."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        return None


@click.command(short_help="Stream the requests the proxies see (req/rsp/end), like linkerd viz tap.")
@_home_option
@click.argument("resource", nargs=-1, metavar="[TYPE[/NAME] | TYPE NAME]")
@_ns_options
@_tap_options
@click.option("-o", "--output", type=click.Choice(["text", "wide", "json"]), default="text",
              show_default=True, help="text: Linkerd's lines; wide: plus resources; json: JSON lines.")
@click.option("--max-events", type=click.IntRange(min=1), default=None, hidden=True,
              help="Stop after this many events (for tests and scripts).")
@click.pass_context
def tap(ctx: click.Context, home_path: Path | None, resource: tuple[str, ...], namespace: str | None,
        all_namespaces: bool, max_rps: float, method: str | None, path: str | None,
        authority: str | None, duration: float | None, output: str, max_events: int | None) -> None:
    """Stream request and response metadata (never bodies) from the proxies of a resource
    (deploy/NAME, pod/NAME, ns/NAME; default: every workload in the namespace). Ctrl-C stops."""
    ns = _namespace(namespace, all_namespaces)
    _label, records = _tapped(_home(ctx, home_path), resource, ns)
    params = tap_mod.TapParams(max_rps, method, path, authority)
    formatter = tap_mod.TapFormatter(wide=output == "wide")
    stop = asyncio.Event()
    count = 0

    def on_event(no: int, rec: dict[str, Any], ev: dict[str, Any]) -> None:
        nonlocal count
        if stop.is_set():
            return
        try:
            click.echo(tap_mod.json_line(rec, ev) if output == "json" else formatter.line(no, ev))
        except BrokenPipeError:
            stop.set()
            return
        count += 1
        if max_events is not None and count >= max_events:
            stop.set()

    _run(tap_mod.run(records, params, on_event, _note, stop, duration))


@click.command(short_help="Live table of the busiest paths, like linkerd viz top (q quits).")
@_home_option
@click.argument("resource", nargs=-1, metavar="[TYPE[/NAME] | TYPE NAME]")
@_ns_options
@_tap_options
@click.pass_context
def top(ctx: click.Context, home_path: Path | None, resource: tuple[str, ...], namespace: str | None,
        all_namespaces: bool, max_rps: float, method: str | None, path: str | None,
        authority: str | None, duration: float | None) -> None:
    """A full-screen view of live traffic (from tap) per source, destination, method and
    path: count, best/worst/last latency and success rate, busiest first. q quits."""
    ns = _namespace(namespace, all_namespaces)
    label, records = _tapped(_home(ctx, home_path), resource, ns)
    params = tap_mod.TapParams(max_rps, method, path, authority)
    table = top_mod.TopTable(top_mod.tapped_set(records))
    notes: list[str] = []
    _run(top_mod.run(records, params, label, table, notes, duration))
    for note in notes:
        _note(note)
    if not sys.stdout.isatty():
        # no screen to draw on (a pipe or a file): print what was collected
        width = max(shutil.get_terminal_size((10_000, 24)).columns, 80)
        click.echo("\n".join(top_mod.render_table(table.sorted_rows(), width)))


# === edges ===

@click.command(short_help="Which workloads talk to which, and whether over mTLS.")
@_home_option
@_ns_options
@click.option("-t", "--time-window", "window", default="1m", show_default=True,
              help="Only edges with traffic in this window.")
@click.option("-o", "--output", type=click.Choice(["table", "wide", "json"]), default="table",
              show_default=True, help="Output format; wide adds CLIENT_ID and SERVER_ID.")
@click.pass_context
def edges(ctx: click.Context, home_path: Path | None, namespace: str | None, all_namespaces: bool,
          window: str, output: str) -> None:
    """The edges between workloads seen in the last minute, like `linkerd viz edges`:
    SRC DST SRC_NS DST_NS SECURED (√ for mTLS)."""
    home = _home(ctx, home_path)
    ns = _namespace(namespace, all_namespaces)
    records = _running(home)
    fetched = stat_mod.fetch(records, _window(window), stat_mod.peer_lookup(records))
    for note in fetched.notes:
        _note(note)
    rows = edges_mod.edges(fetched.stats, ns)
    if output == "json":
        click.echo(edges_mod.render_json(rows), nl=False)
    elif not rows:
        click.echo("No edges found.", err=True)
    else:
        click.echo(edges_mod.render_table(rows, wide=output == "wide"), nl=False)


# === diagnostics ===

@click.group(short_help="Raw diagnostics from the proxies.")
def diagnostics() -> None:
    """Raw diagnostics from the proxies."""


@diagnostics.command("proxy-metrics", short_help="A proxy's raw /metrics.")
@_home_option
@click.argument("name", metavar="NAME")
@click.option("-n", "--namespace", default=None, help="Only replicas in this namespace.")
@click.pass_context
def proxy_metrics(ctx: click.Context, home_path: Path | None, name: str, namespace: str | None) -> None:
    """Print the raw /metrics of each proxy of NAME: deploy/NAME, pod/NAME, or a bare
    workload or instance name, each after a `# POD <instance> (i of n)` header."""
    home = _home(ctx, home_path)
    try:
        what: Target | str = targets.parse_one(name, (DEPLOY, POD, NS)) if "/" in name else name
    except TargetError as e:
        raise click.UsageError(str(e)) from None
    records = diag.matching(what, _running(home), namespace)
    if not records:
        raise click.ClickException(f"no running proxy matches {name}" + (f" in namespace {namespace}"
                                                                        if namespace else ""))
    click.echo(diag.render(diag.fetch(records)), nl=False)


COMMANDS = (stat, top, tap, edges, diagnostics)


def register(group: click.Group) -> None:
    for cmd in COMMANDS:
        group.add_command(cmd)
