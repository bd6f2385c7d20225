"""Workloads of the local mesh: what `mesh run` asks for (``WorkloadSpec``), what a new
replica gets (``plan`` -> ``Launch``), the records their supervisors keep in
``workloads/<instance>.json``, and probes of their proxies' admin ports."""
from __future__ import annotations

import http.client
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from identity import ca, tokens
from identity.store import MeshHome
from microproxy.policy import MODES

from .controlplane import TRUST_DOMAIN
from .procutil import LOOPBACK, MeshError, alive, free_port, port_free, read_json_file

INBOUND_POLICIES = MODES    # `mesh run --default-inbound-policy` choices
NAME_HELP = "a DNS-1123 label: lower-case letters, digits and '-', starting and ending alphanumeric, at most 63"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """What the user asked `mesh run` for."""
    name: str
    cmd: tuple[str, ...]
    namespace: str = "default"
    service_account: str | None = None      # default: the name
    port: int | None = None                 # the app's port; None = client-only
    service_port: int | None = None         # default: the first replica's, else port
    cwd: str = field(default_factory=os.getcwd)
    default_inbound_policy: str | None = None   # MESH_DEFAULT_INBOUND_POLICY; None: the proxy's
    service: str | None = None              # a shared service (`--service`); default: the name

    def validate(self) -> None:
        for what, value in (("name", self.name), ("namespace", self.namespace),
                            ("service account", self.service_account or self.name),
                            ("service", self.service or self.name)):
            if not tokens.valid_name(value):
                raise MeshError(f"invalid {what} {value!r}: want {NAME_HELP}")
        for what, port in (("--port", self.port), ("--service-port", self.service_port)):
            if port is not None and not 1 <= port <= 65535:
                raise MeshError(f"invalid {what} {port}: want 1-65535")
        if self.service_port is not None and self.port is None:
            raise MeshError("--service-port needs --port (a client-only workload has no service)")
        if self.service is not None and self.port is None:
            raise MeshError("--service needs --port (a client-only workload has no service)")
        if not self.cmd:
            raise MeshError("no command: give the app's command after `--`")
        if self.default_inbound_policy not in (None, *INBOUND_POLICIES):
            raise MeshError(f"invalid default inbound policy {self.default_inbound_policy!r}: "
                            f"want one of {', '.join(INBOUND_POLICIES)}")


@dataclass(frozen=True, slots=True)
class Launch:
    """A replica about to be started: the spec plus what `plan()` decided."""
    name: str
    namespace: str
    service_account: str
    instance: str
    cmd: tuple[str, ...]
    cwd: str
    app_port: int | None
    service_port: int | None
    note: str = ""          # e.g. why the app port differs from --port
    default_inbound_policy: str | None = None
    service: str = ""       # the shared service (`--service`); "" = the name
    netns: bool = False             # `mesh run --netns`: its own network namespace (cli/netns.py)
    skip_inbound_ports: str = ""    # --netns: ports init does not redirect inbound
    skip_outbound_ports: str = ""   # --netns: ports init does not redirect outbound

    @property
    def identity(self) -> str:
        return ca.identity_name(self.service_account, self.namespace, TRUST_DOMAIN)

    def argv(self) -> list[str]:
        """Arguments for `python -m cli.supervise` (see supervise.parse_args)."""
        out = ["--name", self.name, "--namespace", self.namespace,
               "--service-account", self.service_account, "--instance", self.instance,
               "--cwd", self.cwd]
        if self.app_port is not None:
            out += ["--port", str(self.app_port)]
        if self.service_port is not None:
            out += ["--service-port", str(self.service_port)]
        if self.default_inbound_policy is not None:
            out += ["--default-inbound-policy", self.default_inbound_policy]
        if self.service and self.service != self.name:
            out += ["--service", self.service]
        if self.netns:
            out += ["--netns", "--skip-inbound-ports", self.skip_inbound_ports,
                    "--skip-outbound-ports", self.skip_outbound_ports]
        return out + ["--", *self.cmd]


def read_workload_files(home: MeshHome) -> list[dict[str, Any]]:
    if not home.workloads_dir.is_dir():
        return []
    out = []
    for path in sorted(home.workloads_dir.glob("*.json")):
        data = read_json_file(path)
        if isinstance(data, dict) and data.get("instance"):
            out.append(data)
    return out


def workload_alive(rec: dict[str, Any]) -> bool:
    return alive(rec.get("supervisor_pid"), rec.get("supervisor_start"))


def list_workloads(home: MeshHome, probe: bool = True) -> list[dict[str, Any]]:
    """The workload records, each with ``alive`` (its supervisor runs) and, with ``probe``,
    ``ready`` checked live against the proxy's admin /ready."""
    out = []
    for rec in read_workload_files(home):
        rec = dict(rec)
        rec["alive"] = workload_alive(rec)
        if probe:
            rec["ready"] = rec["alive"] and alive(rec.get("pid")) and proxy_ready(rec.get("admin_port"))
        elif not rec["alive"]:
            rec["ready"] = False
        out.append(rec)
    out.sort(key=lambda r: (r.get("namespace", ""), r.get("name", ""), r.get("started", 0)))
    return out


def new_instance(home: MeshHome, name: str) -> str:
    while True:
        instance = f"{name}-{secrets.token_hex(2)}"
        if not (home.workloads_dir / f"{instance}.json").exists():
            return instance


def plan(home: MeshHome, spec: WorkloadSpec) -> Launch:
    """Decide the instance id and ports of a new replica.

    A replica of an existing service keeps the service port (the first replica's, unless
    --service-port says otherwise). If its app port is already taken by a running
    replica, the app gets a free port instead (apps read it from $PORT)."""
    spec.validate()
    live = [w for w in list_workloads(home, probe=False) if w["alive"]]
    service = spec.service or spec.name   # replicas of a service: the same name or --service
    siblings = [w for w in live if service in (w.get("service"), w.get("name"))
                and w.get("namespace") == spec.namespace]
    service_port = spec.service_port
    if service_port is None and spec.port is not None:
        service_port = next((w["service_port"] for w in siblings if w.get("service_port")), spec.port)
    app_port, note = spec.port, ""
    if app_port is not None and not port_free(app_port):
        owner = next((w for w in live if w.get("app_port") == app_port), None)
        if owner is None:
            raise MeshError(f"port {app_port} is already in use on {LOOPBACK}: choose another --port")
        app_port = free_port()
        note = (f"port {spec.port} is used by {owner['instance']}; this replica's app "
                f"listens on PORT={app_port}")
    return Launch(name=spec.name, namespace=spec.namespace,
                  service_account=spec.service_account or spec.name,
                  instance=new_instance(home, spec.name), cmd=tuple(spec.cmd), cwd=spec.cwd,
                  app_port=app_port, service_port=service_port, note=note,
                  default_inbound_policy=spec.default_inbound_policy,
                  service="" if service == spec.name else service)


def demo_port(home: MeshHome, service_port: int) -> int:
    """An app port for a demo replica of ``service_port``: that port if free, else any."""
    used = {w.get("app_port") for w in list_workloads(home, probe=False) if w["alive"]}
    if service_port not in used and port_free(service_port):
        return service_port
    return free_port()


def workload_file(home: MeshHome, instance: str) -> Path:
    return home.workloads_dir / f"{instance}.json"


def supervisor_log(home: MeshHome, instance: str) -> Path:
    return home.logs_dir / f"{instance}-supervisor.log"


def app_log(home: MeshHome, instance: str) -> Path:
    return home.logs_dir / f"{instance}.log"


def proxy_log(home: MeshHome, instance: str) -> Path:
    return home.logs_dir / f"{instance}-proxy.log"


def admin_get(port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    """Plain HTTP to a proxy's admin port (never through any http_proxy of ours)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def proxy_ready(admin_port: int | None) -> bool:
    if not admin_port:
        return False
    try:
        status, _ = admin_get(admin_port, "/ready")
    except (OSError, http.client.HTTPException):
        return False
    return status == 200


def service_urls(name: str, namespace: str, port: int | None) -> list[str]:
    """How other workloads address a service (for messages and the README)."""
    if port is None:
        return []
    return [f"http://{name}.{namespace}:{port}", f"http://{name}.{namespace}.svc.cluster.local:{port}",
            f"http://{name}:{port} (from namespace {namespace})"]
