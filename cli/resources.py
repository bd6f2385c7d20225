"""`mesh apply`, `mesh delete`, `mesh get` and `mesh authz`: the mesh's own resources
(AuthorizationPolicy) stored by destination.

Fetching (``Destination``: HTTPS with the CLI's self-issued ``mesh-cli.micromesh``
certificate, the only identity destination lets write), computing (``authz_view``) and
rendering (``render_*``) are separate functions. Files are validated locally, all of
them, before anything is sent, so a bad document changes nothing; destination validates
again. Every failure is one line and a non-zero exit.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click
import h11
import yaml

from destination.resources import KINDS, Resource, ResourceError, kind_named, validate
from identity import ca
from identity.store import MeshHome
from identity.tokens import valid_name
from microproxy.ctlhttp import Client
from microproxy.policy import DEFAULT_MODE

from .options import home_of, home_option
from . import local
from .render import Column, table

F = TypeVar("F", bound=Callable[..., Any])

REQUEST_TIMEOUT = 5.0
AUTHZ_METRICS = ("inbound_http_authz_allow_total", "inbound_http_authz_deny_total",
                 "inbound_tcp_authz_allow_total", "inbound_tcp_authz_deny_total")


_home_option = home_option   # shared with every verb (cli/options.py)
_home = home_of


# === reading files ===

def read_source(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text()
    except OSError as e:
        raise click.ClickException(f"cannot read {name}: {e.strerror or e}") from None


def documents(text: str, source: str) -> list[Any]:
    """The objects of a YAML (multi-document) or JSON text; lists and ``kind: List`` are
    flattened, empty documents skipped."""
    try:
        raw = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise click.ClickException(f"{source}: not valid YAML or JSON: {problem}{where}") from None
    out: list[Any] = []

    def add(obj: Any) -> None:
        if obj is None:
            return
        if isinstance(obj, list):
            for item in obj:
                add(item)
        elif isinstance(obj, dict) and obj.get("kind") == "List" and isinstance(obj.get("items"), list):
            for item in obj["items"]:
                add(item)
        else:
            out.append(obj)

    for doc in raw:
        add(doc)
    return out


def load_resources(sources: Iterable[str]) -> list[Resource]:
    """Every resource of every file, validated; the first bad one is a one-line error."""
    out: list[Resource] = []
    for source in sources:
        docs = documents(read_source(source), "stdin" if source == "-" else source)
        for i, doc in enumerate(docs):
            try:
                out.append(validate(doc))
            except ResourceError as e:
                name = doc.get("metadata", {}).get("name") if isinstance(doc, dict) and \
                    isinstance(doc.get("metadata"), dict) else None
                what = f"document {i + 1}" + (f" ({name})" if isinstance(name, str) else "")
                raise click.ClickException(
                    f"{'stdin' if source == '-' else source}: {what}: {e}") from None
    if not out:
        raise click.ClickException("no resources found in " + ", ".join(sources))
    return out


# === talking to destination ===

class Destination:
    """Requests to destination over mTLS with the CLI identity; one connection per command."""

    def __init__(self, home: MeshHome) -> None:
        try:
            comps = local.require_up(home)
        except local.MeshError as e:
            raise click.ClickException(str(e)) from None
        dest = comps["destination"]
        self.addr = (dest.host, dest.port)
        self.ctx = local.ControlPlaneTLS(home).mutual()
        self.name = ca.identity_name("destination", "micromesh", local.TRUST_DOMAIN)

    def run(self, calls: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
        """Send ``(method, path, body)`` requests in order; (status, decoded JSON) each."""
        async def go() -> list[tuple[int, Any]]:
            client = Client(self.addr[0], self.addr[1], ssl=self.ctx, server_hostname=self.name,
                            timeout=REQUEST_TIMEOUT)
            out = []
            try:
                for method, path, body in calls:
                    status, raw = await client.request(method, path, body)
                    try:
                        data = json.loads(raw) if raw else None
                    except ValueError:
                        data = {"error": raw[:200].decode("latin-1")}
                    out.append((status, data))
            finally:
                await client.close()
            return out

        try:
            return asyncio.run(go())
        except (OSError, ssl.SSLError, asyncio.TimeoutError, h11.ProtocolError, EOFError) as e:
            raise click.ClickException(f"cannot reach destination at {self.addr[0]}:{self.addr[1]}: "
                                       f"{type(e).__name__}: {e}".rstrip(": ")) from None

    def get(self, path: str) -> Any:
        status, data = self.run([("GET", path, None)])[0]
        if status != 200:
            raise click.ClickException(f"destination: {_error(data, status)}")
        return data


def _error(data: Any, status: int) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return f"HTTP {status}"


def resource_path(kind: str, namespace: str, name: str) -> str:
    return "/v1/resources/" + "/".join(quote(p, safe="") for p in (KINDS[kind].plural, namespace, name))


# === apply / delete / get ===

@click.command(short_help="Create or update resources (AuthorizationPolicy, HTTPRoute) from YAML or JSON.")
@_home_option
@click.option("-f", "--filename", "files", multiple=True, required=True, metavar="FILE|-",
              help="A YAML (several documents allowed) or JSON file; - reads stdin. Repeatable.")
@click.pass_context
def apply(ctx: click.Context, home_path: Path | None, files: tuple[str, ...]) -> None:
    """Create or update AuthorizationPolicy resources, as `kubectl apply -f` does.

    \b
    mesh apply -f billing-policy.yaml
    cat policies.yaml | mesh apply -f -
    """
    resources = load_resources(files)
    dest = Destination(_home(ctx, home_path))
    answers = dest.run([("POST", "/v1/resources", r.body) for r in resources])
    for res, (status, data) in zip(resources, answers):
        if status not in (200, 201):
            raise click.ClickException(f"{res.ref}: {_error(data, status)}")
        click.echo(f"{res.ref} {data.get('result', 'configured')}")


@click.command(short_help="Delete resources named in files, or by TYPE NAME.")
@_home_option
@click.argument("args", nargs=-1, metavar="[TYPE NAME...]")
@click.option("-f", "--filename", "files", multiple=True, metavar="FILE|-",
              help="Delete the resources this file describes; - reads stdin. Repeatable.")
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace (with TYPE NAME).")
@click.option("--ignore-not-found", is_flag=True, help="A resource that does not exist is not an error.")
@click.pass_context
def delete(ctx: click.Context, home_path: Path | None, args: tuple[str, ...], files: tuple[str, ...],
           namespace: str, ignore_not_found: bool) -> None:
    """Delete resources: `mesh delete -f FILE` or `mesh delete policy NAME [-n NS]`."""
    if files and args:
        raise click.UsageError("give either -f FILE or TYPE NAME, not both")
    if files:
        targets = [(r.kind, r.namespace, r.name) for r in load_resources(files)]
    elif len(args) >= 2:
        try:
            kind = kind_named(args[0]).name
        except ResourceError as e:
            raise click.UsageError(str(e)) from None
        targets = [(kind, namespace, name) for name in args[1:]]
    else:
        raise click.UsageError("give -f FILE, or TYPE NAME (e.g. `mesh delete policy billing-from-payment`)")
    dest = Destination(_home(ctx, home_path))
    answers = dest.run([("DELETE", resource_path(*t), None) for t in targets])
    missing = []
    for (kind, ns, name), (status, data) in zip(targets, answers):
        ref = f"{kind.lower()}/{name}"
        if status == 200:
            click.echo(f"{ref} deleted")
        elif status == 404:
            missing.append(f"{ref} not found in namespace {ns}")
        else:
            raise click.ClickException(f"{ref}: {_error(data, status)}")
    if missing and not ignore_not_found:
        raise click.ClickException("; ".join(missing))


GET_COLUMNS = (Column("NAMESPACE", "namespace"), Column("NAME", "name"), Column("TARGET", "target"),
               Column("ACTION", "action"), Column("RULES", "rules"), Column("VERSION", "version"))


def target_text(ref: dict[str, Any] | None) -> str:
    if ref is None:
        return "*"
    return ref["name"] + (f":{ref['port']}" if ref.get("port") else "")


def policy_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"namespace": i["metadata"]["namespace"], "name": i["metadata"]["name"],
             "target": target_text(i["spec"].get("targetRef")), "action": i["spec"]["action"],
             "rules": len(i["spec"]["rules"]), "version": i["metadata"].get("resourceVersion")}
            for i in items]


ROUTE_COLUMNS = (Column("NAMESPACE", "namespace"), Column("NAME", "name"), Column("PARENTS", "parents"),
                 Column("BACKENDS", "backends"), Column("RULES", "rules"), Column("VERSION", "version"))


def _ref_text(ref: dict[str, Any], namespace: str, weight: bool = False) -> str:
    name = ref["name"] if ref.get("namespace", namespace) == namespace else f"{ref['namespace']}/{ref['name']}"
    text = name + (f":{ref['port']}" if ref.get("port") else "")
    return text + (f"={ref.get('weight', 1)}" if weight else "")


def route_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HTTPRoutes and GRPCRoutes: parents and the backends of every rule (``name:port=weight``)."""
    rows = []
    for i in items:
        ns, spec = i["metadata"]["namespace"], i["spec"]
        backends: list[str] = []
        for rule in spec.get("rules", []):
            for b in rule.get("backendRefs") or [{"name": "(parent)"}]:
                text = _ref_text(b, ns, weight="weight" in b)
                if text not in backends:
                    backends.append(text)
        rows.append({"namespace": ns, "name": i["metadata"]["name"],
                     "parents": ",".join(_ref_text(p, ns) for p in spec.get("parentRefs", [])),
                     "backends": ",".join(backends), "rules": len(spec.get("rules", [])),
                     "version": i["metadata"].get("resourceVersion")})
    return rows


def for_reapply(item: dict[str, Any]) -> dict[str, Any]:
    """A stored resource without server-set fields (what `-o yaml` prints, to re-apply)."""
    out = dict(item)
    out["metadata"] = {k: v for k, v in item["metadata"].items()
                       if k not in ("resourceVersion", "creationTimestamp")}
    return out


@click.command(short_help="List resources: mesh get policies|routes|grpcroutes [-n NS | -A] [-o json|yaml].")
@_home_option
@click.argument("kind_name", metavar="TYPE")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@click.option("-n", "--namespace", default=None, help="Namespace [default: default].")
@click.option("-A", "--all-namespaces", is_flag=True, help="Resources in every namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True, help="Output format (yaml can be fed back to `mesh apply -f -`).")
@click.pass_context
def get(ctx: click.Context, home_path: Path | None, kind_name: str, names: tuple[str, ...],
        namespace: str | None, all_namespaces: bool, output: str) -> None:
    """List resources of a TYPE: policies (also authorizationpolicies, ap), routes
    (httproutes, hr) or grpcroutes (gr)."""
    try:
        kind = kind_named(kind_name)
    except ResourceError as e:
        raise click.UsageError(str(e)) from None
    if all_namespaces and namespace is not None:
        raise click.UsageError("--all-namespaces and --namespace flags are mutually exclusive")
    ns = None if all_namespaces else (namespace or "default")
    path = f"/v1/resources?kind={kind.plural}" + (f"&namespace={quote(ns)}" if ns else "")
    items = Destination(_home(ctx, home_path)).get(path)["items"]
    if names:
        items = [i for i in items if i["metadata"]["name"] in names]
        found = {i["metadata"]["name"] for i in items}
        lost = [n for n in names if n not in found]
        if lost:
            raise click.ClickException(f"{kind.name.lower()}/{lost[0]} not found"
                                       + (f" in namespace {ns}" if ns else ""))
    if output == "json":
        click.echo(json.dumps(items, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump_all([for_reapply(i) for i in items], sort_keys=False), nl=False)
    elif not items:
        click.echo(f"No {kind.plural} found {'in any namespace' if ns is None else f'in namespace {ns}'}.",
                   err=True)
    else:
        routes = kind.name in ("HTTPRoute", "GRPCRoute")
        cols: tuple[Column, ...] = ROUTE_COLUMNS if routes else GET_COLUMNS
        cols = cols if ns is None else cols[1:]
        click.echo(table(cols, route_rows(items) if routes else policy_rows(items)), nl=False)


# === authz ===

def from_text(src: dict[str, Any] | None) -> str:
    if src is None:
        return "any caller"
    parts = [f"sa:{s}" for s in src.get("serviceAccounts") or ()]
    parts += [f"id:{i}" for i in src.get("identities") or ()]
    parts += [f"ns:{n}" for n in src.get("namespaces") or ()]
    if src.get("unauthenticated"):
        parts.append("unauthenticated")
    return ",".join(parts)


def to_text(dst: dict[str, Any] | None) -> str:
    if dst is None:
        return "any request"
    parts = []
    if dst.get("methods"):
        parts.append(",".join(dst["methods"]))
    if dst.get("paths"):
        parts.append(",".join(dst["paths"]))
    if dst.get("ports"):
        parts.append("port " + ",".join(str(p) for p in dst["ports"]))
    return " ".join(parts)


DEFAULT_MEANS = {"all-unauthenticated": ("any caller", "any request"),
                 "all-authenticated": ("any mesh identity (mTLS)", "any request"),
                 "deny": ("nobody", "-"),
                 "audit": ("any caller (logged as audit)", "any request")}


def authz_counts(metrics_texts: Iterable[str]) -> dict[str, dict[str, float]]:
    """authz_name -> {"allow": n, "deny": n}, summed over proxies' /metrics text."""
    out: dict[str, dict[str, float]] = {}
    for text in metrics_texts:
        for line in text.splitlines():
            name, brace, rest = line.partition("{")
            if not brace or name not in AUTHZ_METRICS:
                continue
            labels_text, _, value = rest.rpartition("} ")
            authz = None
            for part in labels_text.split('",'):
                k, _, v = part.partition('="')
                if k == "authz_name":
                    authz = v.rstrip('"')
            if authz is None:
                continue
            verdict = "allow" if "_allow_" in name else "deny"
            for who in authz.split(","):  # "a,b": denied by (not allowed by any of) a and b
                slot = out.setdefault(who, {"allow": 0.0, "deny": 0.0})
                slot[verdict] += float(value)
    return out


def authz_view(workload: str, namespace: str, snapshot: dict[str, Any],
               replicas: list[dict[str, Any]], counts: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    """What `mesh authz` shows, computed from what was fetched."""
    modes = sorted({r["default"] for r in replicas if r.get("default")})
    default = modes[0] if len(modes) == 1 else (", ".join(modes) if modes else None)
    policies = snapshot.get("policies") or []
    has_allow = any(p["action"] == "ALLOW" for p in policies)

    def n(name: str, verdict: str) -> int | None:
        return None if counts is None else int(counts.get(name, {}).get(verdict, 0))

    rows: list[dict[str, Any]] = []
    for p in policies:
        port = (p.get("targetRef") or {}).get("port")
        common = {"policy": p["name"], "action": p["action"], "port": port or "*",
                  "allowed": n(p["name"], "allow"), "denied": n(p["name"], "deny")}
        if not p["rules"]:
            rows.append({**common, "from": "(no rules)", "to": "(matches nothing)"})
        for i, rule in enumerate(p["rules"]):
            row = dict(common) if i == 0 else {"policy": "", "action": "", "port": "",
                                                "allowed": "", "denied": ""}
            row.update({"from": from_text(rule.get("from")), "to": to_text(rule.get("to"))})
            rows.append(row)
    mode = default if default in DEFAULT_MEANS else None
    frm, to = DEFAULT_MEANS[mode] if mode else ("?", "?")
    dname = f"default:{mode}" if mode else "default"
    rows.append({"policy": "[default]", "action": mode or default or "?", "port": "*",
                 "from": "(overridden by ALLOW policies)" if has_allow else frm,
                 "to": "" if has_allow else to,
                 "allowed": n(dname, "allow") if mode else None,
                 "denied": n(dname, "deny") if mode else None})
    return {"workload": workload, "namespace": namespace, "version": snapshot.get("version"),
            "default": default, "default_applies": not has_allow,
            "replicas": replicas, "policies": policies, "rows": rows}


AUTHZ_COLUMNS = (Column("POLICY", "policy"), Column("ACTION", "action"), Column("PORT", "port"),
                 Column("FROM", "from"), Column("TO", "to"), Column("ALLOWED", "allowed"),
                 Column("DENIED", "denied"))


def render_authz(view: dict[str, Any]) -> str:
    reps = view["replicas"]
    head = (f"{view['workload']}.{view['namespace']}: default inbound policy "
            f"{view['default'] or f'unknown (no running replica; the proxy default is {DEFAULT_MODE})'}"
            f", {len(reps)} running replica{'s' if len(reps) != 1 else ''}, policy version {view['version']}\n")
    rows = [{k: (" " if v == "" else v) for k, v in r.items()} for r in view["rows"]]
    out = head + table(AUTHZ_COLUMNS, rows)
    actions = {p["action"] for p in view["policies"]}
    notes = []
    if "DENY" in actions:
        notes.append("DENY policies win over ALLOW policies.")
    if "ALLOW" in actions:
        notes.append("Requests that no ALLOW policy allows are denied.")
    if "AUDIT" in actions:
        notes.append("AUDIT policies only log (at INFO in the proxy log).")
    if view["replicas"] and any(not r.get("known") for r in view["replicas"]):
        notes.append("Some replicas have not received a policy yet: they deny every request.")
    return out + "".join(f"  {n}\n" for n in notes)


def replica_states(home: MeshHome, workload: str, namespace: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Each running replica's policy state (its proxy's /config) and its /metrics text."""
    reps, texts = [], []
    for rec in local.list_workloads(home, probe=False):
        if rec.get("name") != workload or rec.get("namespace") != namespace or not rec.get("alive"):
            continue
        state: dict[str, Any] = {"instance": rec.get("instance"), "default": rec.get("default_inbound_policy")}
        try:
            status, body = local.admin_get(rec["admin_port"], "/config")
            if status == 200:
                pol = json.loads(body).get("policy") or {}
                state.update(default=pol.get("default"), known=pol.get("known"),
                             version=pol.get("version"), connected=pol.get("connected"))
            status, body = local.admin_get(rec["admin_port"], "/metrics")
            if status == 200:
                texts.append(body.decode())
        except (OSError, ValueError, KeyError, TypeError):
            state["error"] = "proxy not answering"
        reps.append(state)
    return reps, texts


@click.command(short_help="The authorization policies in force for a workload.")
@_home_option
@click.argument("workload")
@click.option("-n", "--namespace", default="default", show_default=True, help="Namespace.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format.")
@click.pass_context
def authz(ctx: click.Context, home_path: Path | None, workload: str, namespace: str, output: str) -> None:
    """List the policies in force for WORKLOAD, what each rule allows or denies, and its
    default inbound policy, with the requests each one allowed and denied so far (from the
    running replicas' proxies), like `linkerd viz authz`."""
    for what, value in (("workload", workload), ("namespace", namespace)):
        if not valid_name(value):
            raise click.UsageError(f"invalid {what} {value!r}: want {local.NAME_HELP}")
    home = _home(ctx, home_path)
    snap = Destination(home).get(f"/v1/policy?workload={workload}&namespace={namespace}")
    reps, texts = replica_states(home, workload, namespace)
    view = authz_view(workload, namespace, snap, reps, authz_counts(texts) if reps else None)
    if output == "json":
        click.echo(json.dumps({k: v for k, v in view.items() if k != "rows"}, indent=2))
    else:
        click.echo(render_authz(view), nl=False)


COMMANDS = (apply, delete, get, authz)


def register(group: click.Group) -> None:
    for cmd in COMMANDS:
        group.add_command(cmd)
