"""The `mesh` command: parse flags, call cli.local, render, exit.

Every failure the user can cause or meet is one line (click.UsageError for bad input,
exit 2; click.ClickException for a failed operation, exit 1), never a traceback.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from identity import tokens
from identity.store import MeshHome

from .options import home_of, home_option
from . import local, observe, render
from . import resources as resources_cli  # apply, delete, get, authz

F = TypeVar("F", bound=Callable[..., Any])


_home_option = home_option   # shared with every verb (cli/options.py)
_home = home_of


def _fail(e: local.MeshError) -> click.ClickException:
    return click.ClickException(str(e))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@_home_option
@click.pass_context
def cli(ctx: click.Context, home_path: Path | None) -> None:
    """micromesh: a Linkerd-style service mesh, run locally.

    \b
    mesh up                                            start the control plane
    mesh run --name books --port 7002 --detach -- CMD  an app with its sidecar proxy
    mesh run --name client -- curl -s http://books.default:7002/
    mesh ps [-o json]                                  the workloads
    mesh down                                          stop everything
    mesh demo                                          a demo app with traffic
    mesh stat deploy                                   golden signals per workload
    mesh top | mesh tap deploy/web | mesh edges        live traffic; who talks to whom
    """
    ctx.obj = MeshHome(home_path.expanduser()) if home_path is not None else MeshHome()


# === up / down ===

def _print_up(result: local.UpResult) -> None:
    ident, dest = result.components["identity"], result.components["destination"]
    if result.already_up:
        click.echo(f"the mesh is already up in {result.home}")
    click.echo(f"mesh home:    {result.home}" + ("  (new trust anchor and issuer)" if result.ca_created else ""))
    click.echo(f"identity:     {ident.addr}  (pid {ident.pid})")
    click.echo(f"destination:  {dest.addr}  (pid {dest.pid})")


@cli.command(short_help="Start the local control plane (identity, destination).")
@_home_option
@click.option("--timeout", type=click.FloatRange(min=1), default=local.UP_TIMEOUT, show_default=True,
              help="Seconds to wait for the control plane to be ready.")
@click.pass_context
def up(ctx: click.Context, home_path: Path | None, timeout: float) -> None:
    """Start identity and destination for a local mesh; returns when both are ready."""
    try:
        result = local.up(_home(ctx, home_path), timeout=timeout)
    except local.MeshError as e:
        raise _fail(e) from None
    _print_up(result)


@cli.command(short_help="Stop every workload and the control plane.")
@_home_option
@click.option("--timeout", type=click.FloatRange(min=1), default=local.DOWN_TIMEOUT, show_default=True,
              help="Seconds to wait for workloads to stop before killing them.")
@click.pass_context
def down(ctx: click.Context, home_path: Path | None, timeout: float) -> None:
    """Stop every workload and the control plane that this mesh home started."""
    home = _home(ctx, home_path)
    result = local.down(home, timeout=timeout)
    if result.nothing:
        click.echo(f"nothing was running in {home.root}")
        return
    parts = []
    if result.workloads:
        n = len(result.workloads)
        parts.append(f"{n} workload{'s' if n != 1 else ''}")
    parts += list(result.control_plane)
    click.echo(f"stopped {', '.join(parts)} ({home.root})")
    if result.killed:
        click.echo(f"killed after the grace period: pids {' '.join(map(str, result.killed))}", err=True)


# === run ===

def _name(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not tokens.valid_name(value):
        raise click.BadParameter(f"{value!r} is not {local.NAME_HELP}", param=param)
    return value


@cli.command(context_settings={"allow_interspersed_args": False},
             short_help="Run an app with its sidecar proxy (again: add a replica).")
@_home_option
@click.option("--name", required=True, callback=_name, help="Workload (and service) name, DNS-1123.")
@click.option("--namespace", default="default", show_default=True, callback=_name, help="Namespace.")
@click.option("--service-account", default=None, callback=_name,
              help="Service account, i.e. the identity (default: the name).")
@click.option("--port", type=click.IntRange(1, 65535), default=None,
              help="The app's port (it gets $PORT). Omit for a client-only workload.")
@click.option("--service-port", type=click.IntRange(1, 65535), default=None,
              help="The service port peers call (default: the first replica's --port).")
@click.option("--service", default=None, callback=_name,
              help="Also put the workload behind this shared service (like a Kubernetes Service "
                   "selecting several workloads); its own name stays resolvable too.")
@click.option("--detach", "-d", is_flag=True, help="Run in the background; return once ready.")
@click.option("--default-inbound-policy", type=click.Choice(local.INBOUND_POLICIES), default=None,
              help="What the proxy allows when no ALLOW policy targets the workload "
                   "[default: all-unauthenticated].")
@click.option("--timeout", type=click.FloatRange(min=1), default=local.RUN_TIMEOUT, show_default=True,
              help="Seconds for the proxy (and, with --port, the app) to be ready.")
@click.option("--netns", is_flag=True,
              help="Run as a pod: its own network namespace on the mesh bridge, iptables "
                   "interception (microproxy init), the proxy as uid 2102, no proxy environment "
                   "for the app (root, Linux; cli/netns.py).")
@click.option("--skip-inbound-ports", default="", metavar="PORTS",
              help="With --netns: inbound ports not redirected to the proxy (e.g. 7003,8000-8100).")
@click.option("--skip-outbound-ports", default="", metavar="PORTS",
              help="With --netns: outbound ports not redirected to the proxy.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
@click.pass_context
def run(ctx: click.Context, home_path: Path | None, name: str, namespace: str,
        service_account: str | None, port: int | None, service_port: int | None, detach: bool,
        timeout: float, cmd: tuple[str, ...], default_inbound_policy: str | None = None,
        service: str | None = None, netns: bool = False, skip_inbound_ports: str = "",
        skip_outbound_ports: str = "") -> None:
    """Run CMD as a meshed workload: the app plus its sidecar proxy.

    The app gets http_proxy/HTTP_PROXY pointing at its proxy, so plain HTTP clients
    reach other workloads as http://NAME.NAMESPACE:PORT through the mesh. Running the
    same --name again adds a replica. Without --detach, exits with the app's exit code.
    """
    home = _home(ctx, home_path)
    spec = local.WorkloadSpec(name=name, cmd=tuple(cmd), namespace=namespace,
                              service_account=service_account, port=port, service_port=service_port,
                              default_inbound_policy=default_inbound_policy, service=service)
    try:
        spec.validate()
    except local.MeshError as e:
        raise click.UsageError(str(e)) from None
    if not netns and (skip_inbound_ports or skip_outbound_ports):
        raise click.UsageError("--skip-inbound-ports/--skip-outbound-ports need --netns")
    if netns:
        from . import netns as netns_mod
        why = netns_mod.unsupported() or netns_mod.bad_ports(skip_inbound_ports, skip_outbound_ports)
        if why:
            raise click.UsageError(why)
    try:
        local.require_up(home)
        if netns:   # the pod has its own ports: the app port is exactly --port
            launch = netns_mod.plan(home, spec, skip_inbound_ports, skip_outbound_ports)
        else:
            launch = local.plan(home, spec)
        if launch.note:
            click.echo(f"mesh: {launch.note}", err=True)
        if not detach:
            ctx.exit(local.run_foreground(home, launch, timeout=timeout))
        rec = local.run_detached(home, launch, timeout=timeout)
    except local.MeshError as e:
        raise _fail(e) from None
    click.echo(f"{rec['instance']} ready: app pid {rec['pid']}, proxy pid {rec['proxy_pid']}, "
               f"identity {rec['identity']}")
    urls = local.service_urls(rec.get("service") or rec["name"], rec["namespace"], rec.get("service_port"))
    if urls:
        click.echo("reachable as " + ", ".join(urls))
    click.echo(f"logs: {rec['logs']['app']} (app), {rec['logs']['proxy']} (proxy)")


# === ps ===

def _ps_row(rec: dict[str, Any]) -> dict[str, Any]:
    row = dict(rec)
    row["service"] = rec.get("service") or (rec.get("name") if rec.get("app_port") else None)
    if not rec.get("alive"):
        row["ready"] = "dead"
    return row


PS_FIELDS = ("name", "namespace", "service", "instance", "identity", "service_account", "ready", "alive",
             "pid", "proxy_pid", "supervisor_pid", "app_port", "service_port", "inbound_port",
             "outbound_port", "admin_port", "detached", "started", "cmd", "logs", "netns", "pod_ip")


@cli.command(short_help="List the workloads: one line per replica.")
@_home_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@click.pass_context
def ps(ctx: click.Context, home_path: Path | None, output: str) -> None:
    """List the workloads (one line per replica) with liveness and readiness."""
    home = _home(ctx, home_path)
    records = local.list_workloads(home, probe=True)
    if output == "json":
        click.echo(json.dumps([{k: r.get(k) for k in PS_FIELDS} for r in records], indent=2))
        return
    click.echo(render.workloads([_ps_row(r) for r in records]), nl=False)
    if local.control_plane(home) is None:
        click.echo(f"(the mesh is not up in {home.root}: `mesh up` starts it)", err=True)


# === demo ===

DEMO_DIR = Path(__file__).parent / "demo"
DEMO = (  # name, port, replicas, script
    ("authors", 7001, 2, "authors.py"),
    ("books", 7002, 1, "books.py"),
    ("web", 7000, 1, "web.py"),
    ("traffic", None, 1, "traffic.py"),
)

NEXT_STEPS = """\
The demo is running: traffic -> web -> books and authors, books -> authors (2 replicas, ~5 % errors).

Try next:
  mesh{home} ps                        # each replica: pids, ports, identity, readiness
  mesh{home} stat deploy               # success rate, RPS, latency per workload (authors < 100 %)
  mesh{home} top                       # live: the busiest paths and their success rates (q quits)
  mesh{home} edges                     # who calls whom, over mTLS
  mesh{home} run --name me -- curl -s http://web.default:7000/
                                    # a one-shot meshed request (mTLS, metrics, balancing)
  curl -s http://127.0.0.1:{admin}/metrics | grep response_total
                                    # web's proxy: golden signals per peer identity
  mesh{home} down                      # stop everything
"""


@cli.command(short_help="Start the mesh, a demo app and traffic; print what to try.")
@_home_option
@click.pass_context
def demo(ctx: click.Context, home_path: Path | None) -> None:
    """Start the mesh and a demo app: web -> books -> authors, plus a traffic generator."""
    home = _home(ctx, home_path)
    home_flag = "" if home.root == MeshHome().root else f" --home {home.root}"
    try:
        _print_up(local.up(home))
        running = {(w["name"], w["namespace"]) for w in local.list_workloads(home, probe=False) if w["alive"]}
        for name, port, replicas, script in DEMO:
            if (name, "default") in running:
                click.echo(f"{name}: already running")
                continue
            for _ in range(replicas):
                # The service port is fixed (the apps call each other by it); the app port
                # is the same unless that port is taken on this machine.
                app_port = None if port is None else local.demo_port(home, port)
                spec = local.WorkloadSpec(name=name, cmd=(sys.executable, str(DEMO_DIR / script)),
                                          port=app_port, service_port=port, cwd=str(home.root))
                rec = local.run_detached(home, spec)
                click.echo(f"{rec['instance']}: ready (app port {rec['app_port'] or '-'}, "
                           f"proxy admin {rec['admin_port']})")
    except local.MeshError as e:
        raise _fail(e) from None
    web = next((w for w in local.list_workloads(home, probe=False) if w["name"] == "web"), None)
    click.echo("")
    click.echo(NEXT_STEPS.format(home=home_flag, admin=web["admin_port"] if web else "ADMIN"), nl=False)


# === check ===

@cli.command(short_help="Check the mesh's health, as `linkerd check` does.")
@_home_option
@click.option("--pre", is_flag=True, help="Only check that this machine can run a mesh (before `mesh up`).")
@click.option("--proxy", is_flag=True, help="Also check every workload's proxy (the data plane).")
@click.option("-o", "--output", type=click.Choice(["basic", "json"]), default="basic", show_default=True,
              help="Output format.")
@click.pass_context
def check(ctx: click.Context, home_path: Path | None, pre: bool, proxy: bool, output: str) -> None:
    """Check the mesh home, its CA, the control plane and (with --proxy) the proxies.

    Prints √ for a passed check, ‼ for a warning and × for a failure, with a hint under
    each problem. Exits 1 if any check failed (warnings alone exit 0).
    """
    from . import check as health
    from . import checks
    if pre and proxy:
        raise click.UsageError("--pre and --proxy cannot be combined")
    context = checks.CheckContext(_home(ctx, home_path))
    todo = checks.selected(pre=pre, proxy=proxy)
    if output == "json":
        collect = health.Collector()
        success = health.run(todo, context, collect, checks.DEPENDS)
        click.echo(json.dumps(health.to_json(collect.results, success), indent=2))
    else:
        text = health.TextRenderer()
        success = health.run(todo, context, lambda r: click.echo(text.feed(r), nl=False), checks.DEPENDS)
        click.echo(text.finish(success), nl=False)
    ctx.exit(0 if success else 1)


# === prometheus-config ===

def _duration(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    from . import promconfig
    if not promconfig.valid_duration(value):
        raise click.BadParameter(f"{value!r} is not a Prometheus duration such as 1s, 500ms or 1m", param=param)
    return value


@cli.command("prometheus-config", short_help="Print a Prometheus scrape config for the local proxies.")
@_home_option
@click.option("--interval", default="1s", show_default=True, callback=_duration,
              help="The scrape interval.")
@click.option("--file-sd", "file_sd", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the targets to this file_sd JSON file (re-run to refresh it) and print a "
                   "config that reads it.")
@click.pass_context
def prometheus_config(ctx: click.Context, home_path: Path | None, interval: str, file_sd: Path | None) -> None:
    """Print a prometheus.yml whose job `micromesh-proxy` scrapes every proxy's admin
    /metrics, labelled namespace, workload and pod."""
    from . import promconfig
    home = _home(ctx, home_path)
    groups = promconfig.targets(local.list_workloads(home, probe=False))
    if file_sd is not None:
        file_sd = file_sd.expanduser().absolute()
        try:
            promconfig.write_file_sd(file_sd, groups)
        except OSError as e:
            raise click.ClickException(f"cannot write {file_sd}: {e.strerror}") from None
    click.echo(promconfig.render(promconfig.config(groups, interval, file_sd)), nl=False)
    if not groups:
        click.echo(f"(no workloads are running in {home.root}: the config has no targets yet)", err=True)


# === stat, top, tap, edges, diagnostics: cli/observe.py ===

observe.register(cli)
resources_cli.register(cli)   # mesh apply / delete / get / authz: cli/resources.py

from .resilience_cmd import register as _register_resilience  # noqa: E402

_register_resilience(cli)     # mesh routes / proxy-status: cli/resilience_cmd.py


# === identity: certificates and their rotation (cli/identity_cmd.py) ===

from .identity_cmd import register as _register_identity  # noqa: E402

_register_identity(cli)


# === Kubernetes: install, uninstall, inject (cli/inject.py, manifests in cli/install.py) ===

from .inject import register as _register_kubernetes  # noqa: E402

_register_kubernetes(cli)


def main() -> None:
    cli(prog_name="mesh")


if __name__ == "__main__":
    main()
