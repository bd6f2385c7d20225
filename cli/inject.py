"""`mesh install`, `mesh uninstall` and `mesh inject`: the Kubernetes path of the CLI.

Manifests come from cli/install.py and the injection from destination/inject.py (the
transform the webhook also uses); this module reads files, walks YAML documents, writes
YAML to stdout and reports to stderr as `linkerd inject` does::

    deployment "web" injected
    service "web" skipped: not a workload
"""
from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from destination import inject as tx
from identity import tokens
from identity.store import MeshHome

from . import install as kube

# kind -> where its pod template is (Pod: the object itself)
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),
}
YAML_SUFFIXES = (".yaml", ".yml", ".json")


class InjectFailed(click.ClickException):
    """A one-line failure of `mesh inject` (exit 1)."""


# === YAML out ===

class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    if "\n" in value:  # PEM bundles and the like: a readable literal block
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def dump_all(objs: Iterable[Any]) -> str:
    return "".join("---\n" + yaml.dump(o, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
                   for o in objs)


# === the walk over objects ===

@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    injected: int = 0

    def add(self, line: str) -> None:
        self.lines.append(line)


def _describe(obj: dict[str, Any]) -> str:
    kind = str(obj.get("kind") or "object").lower()
    name = (obj.get("metadata") or {}).get("name") or (obj.get("metadata") or {}).get("generateName") or ""
    return f'{kind} "{name}"'


def _template(obj: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    node: Any = obj
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _set(obj: dict[str, Any], path: tuple[str, ...], value: dict[str, Any]) -> dict[str, Any]:
    if not path:
        return value
    out = dict(obj)
    out[path[0]] = _set(obj[path[0]], path[1:], value)
    return out


Transform = Callable[[dict[str, Any], dict[str, Any]], tx.Result]   # (object, template) -> result


def process(obj: Any, transform: Transform, report: Report, manual: bool) -> Any:
    """One document: a workload (its template transformed), a List, a Namespace, or other."""
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        raise InjectFailed("a document is not a Kubernetes object (no kind)")
    kind = obj["kind"]
    what = _describe(obj)
    if kind == "List" or (kind.endswith("List") and isinstance(obj.get("items"), list)):
        items = obj.get("items")
        if not isinstance(items, list):
            raise InjectFailed(f"{what}: items must be a list")
        return {**obj, "items": [process(i, transform, report, manual) for i in items]}
    if kind == "Namespace":
        if manual:
            report.add(f"{what} skipped: namespaces opt in with the annotation (run without --manual)")
            return obj
        meta = obj.get("metadata") or {}
        ann = {**(meta.get("annotations") or {}), tx.INJECT_ANNOTATION: tx.ENABLED}
        report.add(f"{what} annotated")
        return {**obj, "metadata": {**meta, "annotations": ann}}
    path = TEMPLATE_PATHS.get(kind)
    if path is None:
        report.add(f"{what} skipped: not a workload")
        return obj
    template = _template(obj, path)
    if template is None:
        raise InjectFailed(f"{what}: {'.'.join(path) or 'the object'} is not a pod template")
    try:
        result = transform(obj, template)
    except tx.InjectError as e:
        raise InjectFailed(f"{what}: {e}") from None
    for note in result.notes:
        report.add(f"{what}: {note}")
    if not result.injected:
        report.add(f"{what} skipped: {result.reason}")
        return obj
    report.injected += 1
    report.add(f"{what} injected")
    return _set(obj, path, result.template)


def manual_transform(config: tx.InjectConfig) -> Transform:
    def run(obj: dict[str, Any], template: dict[str, Any]) -> tx.Result:
        meta = obj.get("metadata") or {}
        owner = tx.owner_of(obj) if obj.get("kind") == "Pod" else \
            tx.Owner(obj["kind"].lower(), str(meta.get("name") or ""))
        return tx.inject_pod(template, owner, config, namespace=meta.get("namespace"))
    return run


def annotate_transform(obj: dict[str, Any], template: dict[str, Any]) -> tx.Result:
    return tx.annotate(template)


# === reading ===

def read_sources(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(name, text) of each file: ``-`` is stdin; a directory is walked for YAML/JSON files."""
    out = []
    for p in paths:
        if p == "-":
            out.append(("<stdin>", sys.stdin.read()))
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in YAML_SUFFIXES)
            if not files:
                raise InjectFailed(f"{p}: no .yaml, .yml or .json files in the directory")
        elif path.exists():
            files = [path]
        else:
            raise InjectFailed(f"{p}: no such file or directory")
        for f in files:
            try:
                out.append((str(f), f.read_text()))
            except (OSError, UnicodeDecodeError) as e:
                raise InjectFailed(f"{f}: cannot read: {e}") from None
    return out


def parse_documents(name: str, text: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InjectFailed(f"{name}: not valid YAML{where}: {problem}") from None


# === commands ===

def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _read_file(param: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise click.UsageError(f"{param} {path}: {e.strerror}") from None


def _namespace(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not tokens.valid_name(value):
        raise click.BadParameter(f"{value!r} is not a DNS-1123 label", param=param)
    return value


def _image(_ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not value or any(c.isspace() for c in value) or value.startswith(("-", ":", "@")):
        raise click.BadParameter(f"{value!r} is not an image reference such as micromesh:dev", param=param)
    return value


_FILE = click.Path(dir_okay=False, path_type=Path)


@click.command(short_help="Print the Kubernetes manifests of the control plane.")
@click.option("--identity-trust-anchors-file", "anchors_file", type=_FILE, default=None,
              help="PEM trust anchors (default: a new anchor is generated).")
@click.option("--identity-issuer-certificate-file", "issuer_file", type=_FILE, default=None,
              help="PEM issuer certificate, signed by the trust anchors.")
@click.option("--identity-issuer-key-file", "key_file", type=_FILE, default=None,
              help="PEM (ECDSA) key of the issuer certificate.")
@click.option("--identity-trust-domain", "trust_domain", default="cluster.local", show_default=True,
              help="Trust domain of the mesh identities.")
@click.option("--ha", is_flag=True, help="3 replicas, PodDisruptionBudgets, anti-affinity, webhook failurePolicy Fail.")
@click.option("--image", default=tx.DEFAULT_IMAGE, show_default=True, callback=_image,
              help="The one image of identity, destination, proxy and init.")
@click.option("--namespace", default=tx.DEFAULT_NAMESPACE, show_default=True, callback=_namespace,
              help="The control plane's namespace.")
@click.option("--cluster-domain", default="cluster.local", show_default=True, help="The cluster's DNS domain.")
@click.option("--crds", is_flag=True, help="Print only the CustomResourceDefinitions (step one of two).")
def install(anchors_file: Path | None, issuer_file: Path | None, key_file: Path | None, trust_domain: str,
            ha: bool, image: str, namespace: str, cluster_domain: str, crds: bool) -> None:
    """Print every manifest the cluster needs, for `mesh install | kubectl apply -f -`.

    Without the three --identity-* files a trust anchor and an issuer are generated (the
    anchor's key is not kept: rotate by installing with your own files).
    """
    if crds:
        click.echo(dump_all(kube.crds()), nl=False)
        return
    given = [f for f in (anchors_file, issuer_file, key_file) if f is not None]
    if given and len(given) != 3:
        raise click.UsageError("give all three of --identity-trust-anchors-file, "
                               "--identity-issuer-certificate-file and --identity-issuer-key-file, or none")
    opts = kube.InstallOptions(namespace=namespace, image=image, ha=ha, trust_domain=trust_domain,
                               cluster_domain=cluster_domain)
    if given:
        assert anchors_file and issuer_file and key_file
        try:
            certs = kube.load_certs(opts, _read_file("--identity-trust-anchors-file", anchors_file),
                                    _read_file("--identity-issuer-certificate-file", issuer_file),
                                    _read_file("--identity-issuer-key-file", key_file), _now())
        except kube.InstallError as e:
            raise click.UsageError(str(e)) from None
    else:
        certs = kube.generate_certs(opts, _now())
    click.echo(dump_all(kube.manifests(opts, certs)), nl=False)


@click.command(short_help="Print what to delete to remove the control plane.")
@click.option("--namespace", default=tx.DEFAULT_NAMESPACE, show_default=True, callback=_namespace,
              help="The control plane's namespace.")
def uninstall(namespace: str) -> None:
    """Print every object `mesh install` makes, for
    `mesh uninstall | kubectl delete --ignore-not-found -f -`. Deleting the CRDs deletes
    every AuthorizationPolicy; meshed pods keep their proxies until restarted."""
    click.echo(dump_all(kube.uninstall(kube.InstallOptions(namespace=namespace))), nl=False)


@click.command(short_help="Add the injection annotation (or, with --manual, the proxy) to workloads.")
@click.argument("paths", nargs=-1, required=True, metavar="FILE|DIR|-...")
@click.option("--manual", is_flag=True, help="Inject the init container and the proxy here, not in the webhook.")
@click.option("--identity-trust-anchors-file", "anchors_file", type=_FILE, default=None,
              help="With --manual: the mesh's trust anchors (default: the mesh home's bundle).")
@click.option("--identity-trust-domain", "trust_domain", default="cluster.local", show_default=True,
              help="With --manual: the trust domain.")
@click.option("--image", default=tx.DEFAULT_IMAGE, show_default=True, callback=_image,
              help="With --manual: the image of the injected containers.")
@click.option("--control-plane-namespace", default=tx.DEFAULT_NAMESPACE, show_default=True,
              callback=_namespace, help="With --manual: the control plane's namespace.")
@click.option("--cluster-domain", default="cluster.local", show_default=True,
              help="With --manual: the cluster's DNS domain.")
@click.pass_context
def inject(ctx: click.Context, paths: tuple[str, ...], manual: bool, anchors_file: Path | None,
           trust_domain: str, image: str, control_plane_namespace: str, cluster_domain: str) -> None:
    """Read Kubernetes YAML (files, directories, or - for stdin) and write it to stdout with
    `micromesh.io/inject: enabled` on every pod template, for the webhook to inject; or with
    --manual, with the proxy injected. Handles Deployments, StatefulSets, DaemonSets,
    ReplicaSets, Jobs, CronJobs, Pods, Namespaces, multi-document YAML and Lists; reports
    each object on stderr."""
    transform: Transform = annotate_transform
    if manual:
        transform = manual_transform(tx.InjectConfig(
            trust_anchors_pem=_trust_anchors(ctx, anchors_file), control_plane_namespace=control_plane_namespace,
            image=image, trust_domain=trust_domain, cluster_domain=cluster_domain))
    report = Report()
    out = []
    try:
        for name, text in read_sources(paths):
            for doc in parse_documents(name, text):
                out.append(process(doc, transform, report, manual))
    finally:
        for line in report.lines:
            click.echo(line, err=True)
    click.echo(dump_all(out), nl=False)


def _trust_anchors(ctx: click.Context, anchors_file: Path | None) -> bytes:
    if anchors_file is not None:
        pem = _read_file("--identity-trust-anchors-file", anchors_file)
    else:
        home = ctx.find_object(MeshHome) or MeshHome()
        if not home.trust_file().exists():
            raise click.UsageError(
                "--manual needs the mesh's trust anchors: pass --identity-trust-anchors-file F (in a "
                "cluster: kubectl -n micromesh get configmap micromesh-identity-trust-roots "
                "-o jsonpath='{.data.ca-bundle\\.crt}' > F)")
        pem = home.trust_pem()
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise click.UsageError("--identity-trust-anchors-file holds no PEM certificate")
    return pem


def register(cli: click.Group) -> None:
    cli.add_command(install)
    cli.add_command(uninstall)
    cli.add_command(inject)
