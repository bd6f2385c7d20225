"""`mesh identity`: the proxies' certificates, and zero-downtime issuer and anchor rotation.

    mesh identity [WORKLOAD] [-o json]        each replica's certificate, as its peers see it
    mesh identity rotate-issuer               new issuer (same anchor), pushed to every proxy
    mesh identity rotate-anchor [--phase P]   add | reissue | remove | all (default: all)

A rotation step changes the CA files (identity/rotation.py); identity and destination
reload them by themselves; then every proxy is asked to renew at once (admin
``POST /renew``) and must report the new state (its trust anchors, the issuer of its
leaf) before the step counts as done. `all` runs the anchor phases in order with that
check between them; an interrupted rotation resumes where it stopped.
"""
from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity import ca, rotation
from identity.store import MeshHome
from microproxy import tls
from microproxy.identity_client import fingerprint

from . import local

PUSH_TIMEOUT = 30.0


class RotationFailed(local.MeshError):
    pass


# === talking to proxies and the control plane ===

def served_cert(port: int, server_name: str, trust_pem: bytes, chain: bytes | None = None,
                key: bytes | None = None, host: str = local.LOOPBACK,
                timeout: float = 3.0) -> x509.Certificate:
    """The leaf a TLS server presents, verified against ``trust_pem`` for ``server_name``."""
    ctx = tls.client_context(trust_pem, chain, key)
    with socket.create_connection((host, port), timeout=timeout) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def admin_json(port: int, method: str, path: str, timeout: float = 20.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(local.LOOPBACK, port, timeout=timeout)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, {"error": body.decode("utf-8", "replace")[:200]}


def _short(fp: str | None) -> str:
    return (fp or "?")[:16]


def check_report(report: dict[str, Any], exp: rotation.Expected) -> str | None:
    """Why a proxy's /renew (or /config) report is not at ``exp`` yet, or None."""
    anchors = tuple(report.get("trust_anchors") or ())
    cert = report.get("certificate") or {}
    if anchors != exp.anchors:
        return (f"trusts {', '.join(map(_short, anchors)) or 'nothing'}, want "
                f"{', '.join(map(_short, exp.anchors))}")
    if cert.get("issuer_fingerprint") != exp.issuer:
        return f"leaf issued by {_short(cert.get('issuer_fingerprint'))}, want {_short(exp.issuer)}"
    return None


def wait_control_plane(home: MeshHome, timeout: float) -> None:
    """Wait until identity and destination serve certificates from the current issuer
    (they reload the CA files on the next handshake, or within a second)."""
    comps = local.control_plane(home)
    if comps is None:
        return
    m = rotation.load_material(home)
    chain, key = ca.self_issue(local.CLI_IDENTITY, m.issuer, m.issuer_key, local.utcnow(),
                               lifetime=dt.timedelta(minutes=5))
    deadline = local.monotonic() + timeout
    for name, comp in comps.items():
        server_name = ca.identity_name(name, "micromesh", local.TRUST_DOMAIN)
        last = ""
        while True:
            try:
                leaf = served_cert(comp.port, server_name, m.bundle_pem, chain, key, host=comp.host)
                if rotation.signed_by(leaf, m.issuer):
                    break
                last = "it still serves a certificate from the previous issuer"
            except (OSError, ssl.SSLError) as e:
                last = str(e)
            if local.monotonic() > deadline:
                raise RotationFailed(f"{name} did not pick up the new CA files within {timeout:g} s: {last}")
            local.sleep(0.1)


def renew_proxy(home: MeshHome, rec: dict[str, Any], exp: rotation.Expected,
                deadline: float) -> tuple[bool, str]:
    """POST /renew to one replica until it reports ``exp`` (or the deadline passes)."""
    last = "no answer"
    while True:
        port = rec.get("admin_port")
        if not port:  # still starting: its record gets the port once the proxy listens
            rec = local.read_json_file(local.workload_file(home, rec["instance"])) or rec
            last = "its proxy has no admin port yet"
        else:
            try:
                status, body = admin_json(int(port), "POST", "/renew")
                if status == 200:
                    why = check_report(body, exp)
                    if why is None:
                        return True, f"renewed: leaf {_short((body.get('certificate') or {}).get('fingerprint'))}"
                    last = why
                else:
                    last = f"HTTP {status}: {body.get('error', body)}"
            except (OSError, http.client.HTTPException) as e:
                last = f"admin port {port}: {e}"
        if not local.workload_alive(rec):
            return True, "exited (nothing to renew)"
        if local.monotonic() > deadline:
            return False, last
        local.sleep(0.2)


def push(home: MeshHome, echo: Callable[[str], None], timeout: float = PUSH_TIMEOUT) -> int:
    """Make the control plane and every running proxy adopt the home's current CA state.
    Returns the number of proxies renewed; raises RotationFailed naming those that did not."""
    exp = rotation.expected(home)
    records = [r for r in local.list_workloads(home, probe=False) if r["alive"]]
    if records and local.control_plane(home) is None:
        raise RotationFailed(f"workloads are running but the control plane is not: `mesh up` first "
                             f"({home.root})")
    deadline = local.monotonic() + timeout
    wait_control_plane(home, timeout)
    failed = []
    for rec in records:
        ok, detail = renew_proxy(home, rec, exp, deadline)
        echo(f"  {rec['instance']:<24} {'ok' if ok else 'FAILED'}  {detail}")
        if not ok:
            failed.append(rec["instance"])
    if failed:
        raise RotationFailed(f"{len(failed)} prox{'y' if len(failed) == 1 else 'ies'} did not take the "
                             f"new state: {', '.join(failed)} (run the command again to retry)")
    return len(records)


# === rendering certificates ===

def cert_info(cert: x509.Certificate) -> dict[str, Any]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [f"DNS:{v}" for v in san.get_values_for_type(x509.DNSName)] + \
               [f"URI:{v}" for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "sans": sans,
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint": fingerprint(cert.public_bytes(serialization.Encoding.DER)),
    }


def _left(not_after: str) -> str:
    secs = (dt.datetime.fromisoformat(not_after) - local.utcnow()).total_seconds()
    if secs <= 0:
        return "expired"
    h, rem = divmod(int(secs), 3600)
    return f"in {h}h {rem // 60}m" if h else f"in {rem // 60}m {rem % 60}s"


def show(home: MeshHome, workload: str | None, output: str) -> int:
    records = [r for r in local.list_workloads(home, probe=False) if r["alive"]]
    if workload:
        records = [r for r in records if workload in (r.get("name"), r.get("instance"))]
        if not records:
            raise click.ClickException(f"no running workload or replica named {workload!r} in {home.root}")
    trust = home.trust_pem()
    rows, errors = [], 0
    for rec in records:
        row: dict[str, Any] = {"instance": rec["instance"], "workload": rec.get("name"),
                               "namespace": rec.get("namespace"), "identity": rec.get("identity")}
        try:
            port = rec.get("inbound_port")
            if not port:
                raise OSError("no inbound port yet (starting)")
            row["certificate"] = cert_info(served_cert(int(port), rec["identity"], trust))
        except (OSError, ssl.SSLError, ValueError) as e:
            row["error"] = str(e)
            errors += 1
        try:
            status, cfg = admin_json(int(rec.get("admin_port") or 0), "GET", "/config", timeout=2.0)
            if status == 200:
                row["trust_anchors"] = cfg.get("trust_anchors")
                row["issuer_fingerprint"] = (cfg.get("certificate") or {}).get("issuer_fingerprint")
        except (OSError, http.client.HTTPException, ValueError):
            pass
        rows.append(row)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
        return errors
    if not rows:
        click.echo(f"no workloads are running in {home.root}")
    for row in rows:
        click.echo(f"{row['instance']}  ({row['identity']})")
        cert = row.get("certificate")
        if cert is None:
            click.echo(f"  error       {row.get('error')}")
        else:
            click.echo(f"  subject     {cert['subject']}")
            click.echo(f"  SANs        {', '.join(cert['sans'])}")
            click.echo(f"  issuer      {cert['issuer']}"
                       + (f"  (sha256 {_short(row.get('issuer_fingerprint'))})" if row.get("issuer_fingerprint") else ""))
            click.echo(f"  serial      {cert['serial']}")
            click.echo(f"  not before  {cert['not_before']}")
            click.echo(f"  not after   {cert['not_after']}  ({_left(cert['not_after'])})")
        if row.get("trust_anchors") is not None:
            click.echo(f"  trusts      {', '.join(map(_short, row['trust_anchors']))}")
    note = rotation.rotation_in_progress(home)
    if note:
        click.echo(f"note: {note}", err=True)
    return errors


# === commands ===

def _home_of(ctx: click.Context, home_path: Path | None) -> MeshHome:
    if home_path is not None:
        return MeshHome(home_path.expanduser())
    parent = ctx.find_object(MeshHome)
    return parent if parent is not None else MeshHome()


_home_opt = click.option("--home", "home_path", type=click.Path(file_okay=False, path_type=Path),
                         default=None, help="The mesh home (default: $MESH_HOME, else ~/.micromesh).")
_output_opt = click.option("-o", "--output", type=click.Choice(["table", "json"]), default=None,
                           help="Output format (default: table).")
_timeout_opt = click.option("--timeout", type=click.FloatRange(min=1), default=PUSH_TIMEOUT,
                            show_default=True, help="Seconds for every proxy to take each step.")


class _IdentityGroup(click.Group):
    """`mesh identity WORKLOAD`: a word that is not a subcommand names a workload."""

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "show", self.commands["show"], args
        return super().resolve_command(ctx, args)


@click.group("identity", cls=_IdentityGroup, invoke_without_command=True,
             short_help="Proxy certificates; rotate the issuer or the trust anchor.")
@_home_opt
@_output_opt
@click.pass_context
def identity(ctx: click.Context, home_path: Path | None, output: str | None) -> None:
    """Show each proxy's certificate (as its peers see it in the TLS handshake), or
    rotate the issuer or the trust anchor with zero downtime.

    \b
    mesh identity [WORKLOAD] [-o json]
    mesh identity rotate-issuer
    mesh identity rotate-anchor [--phase add|reissue|remove|all]
    """
    home = _home_of(ctx, home_path)
    ctx.obj = home
    ctx.meta["identity_output"] = output
    if ctx.invoked_subcommand is None:
        ctx.exit(1 if show(home, None, output or "table") else 0)


@identity.command("show", hidden=True)
@click.argument("workload")
@_output_opt
@click.pass_context
def show_cmd(ctx: click.Context, workload: str, output: str | None) -> None:
    home = ctx.find_object(MeshHome) or MeshHome()
    ctx.exit(1 if show(home, workload, output or ctx.meta.get("identity_output") or "table") else 0)


def _run_step(home: MeshHome, title: str, timeout: float) -> None:
    click.echo(title)
    n = push(home, click.echo, timeout)
    rotation.confirm(home)
    click.echo(f"  done: {n} prox{'y' if n == 1 else 'ies'} renewed")


@identity.command("rotate-issuer", short_help="Replace the issuer (same anchor), with zero downtime.")
@_timeout_opt
@click.pass_context
def rotate_issuer(ctx: click.Context, timeout: float) -> None:
    """Make a new issuer signed by the current trust anchor; identity and destination reload
    it; every proxy renews at once and must report a leaf from the new issuer."""
    home = ctx.find_object(MeshHome) or MeshHome()
    if not home.has_ca():
        raise click.ClickException(f"no mesh CA in {home.root} (create one with `mesh up`)")
    try:
        state = rotation.rotate_issuer(home, local.utcnow())
        _run_step(home, f"new issuer {_short(state['issuer'])} (anchor {_short(state['anchor'])})", timeout)
    except (rotation.RotationError, local.MeshError) as e:
        raise click.ClickException(str(e)) from None


ANCHOR_TITLES = {
    "add": "phase add: new trust anchor {new}; bundle = old {old} + new {new}",
    "reissue": "phase reissue: new issuer {issuer} signed by the new anchor {new}",
    "remove": "phase remove: bundle = new anchor {new} only; old anchor {old} retired",
}


@identity.command("rotate-anchor", short_help="Replace the trust anchor in three phases.")
@click.option("--phase", type=click.Choice(["add", "reissue", "remove", "all"]), default="all",
              show_default=True, help="Run one phase, or all that are left (resumes).")
@_timeout_opt
@click.pass_context
def rotate_anchor(ctx: click.Context, phase: str, timeout: float) -> None:
    """Rotate the trust anchor through a bundle holding old and new anchors:

    \b
    add      new anchor; every proxy trusts old + new
    reissue  new issuer signed by the new anchor; every proxy renews its leaf
    remove   bundle = new anchor only; the old one is gone from every proxy

    Each phase completes only when every proxy reports it; run them one at a time with
    --phase, or all that are left (the default)."""
    home = ctx.find_object(MeshHome) or MeshHome()
    if not home.has_ca():
        raise click.ClickException(f"no mesh CA in {home.root} (create one with `mesh up`)")
    try:
        if phase == "all":
            due = rotation.next_anchor_phase(rotation.read_state(home))
            todo = list(rotation.PHASES[rotation.PHASES.index(due or "add"):])
        else:
            todo = [phase]
        for step in todo:
            state = rotation.anchor_phase(home, step, local.utcnow())
            title = ANCHOR_TITLES[step].format(new=_short(state.get("new_anchor")),
                                               old=_short(state.get("old_anchor")),
                                               issuer=_short(state.get("issuer")))
            _run_step(home, title, timeout)
    except (rotation.RotationError, local.MeshError) as e:
        raise click.ClickException(str(e)) from None
    if rotation.rotation_in_progress(home) is None:
        click.echo("trust anchor rotation complete")
    else:
        nxt = rotation.next_anchor_phase(rotation.read_state(home))
        click.echo(f"next: mesh identity rotate-anchor --phase {nxt}")


def register(cli: click.Group) -> None:
    cli.add_command(identity)
