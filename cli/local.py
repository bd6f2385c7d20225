"""Process management for the local mesh: `mesh up`, `run`, `ps`, `down`, as functions.

Theory of operation
-------------------
Everything a mesh home starts is findable from files in that home, so any later
``mesh`` invocation (or a test, or a benchmark) can inspect and stop it:

- ``controlplane.json`` keeps, per component (identity, destination), the loopback port
  chosen the first time (reused on every later ``up``, so the addresses proxies were
  given stay valid across restarts) and, while it runs, its pid and kernel start time.
- ``workloads/<instance>.json`` is written by the supervisor of each replica from the
  moment it starts, and removed by it when it exits.

Process layout (Linux sessions and process groups are the unit of cleanup):

- identity and destination each lead their own session.
- A detached ``mesh run`` supervisor leads its own session; inside it the proxy and the
  app each lead a process group, so everything a detached workload ever forks lives in
  one session that ``down`` can sweep.
- A foreground ``mesh run`` is the supervisor itself: the app stays in the terminal's
  process group (it reads the terminal and gets Ctrl-C), the proxy leads its own session
  (the terminal's signals never reach it; the supervisor stops it after the app).

A pid is only trusted together with its start time (procutil.py), so
a recycled pid is never signalled. Zombies count as dead.

Nothing here prints or exits: failures raise ``MeshError`` with a one-line message that
the CLI shows as is.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import http.client
import os
import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from identity import ca, tokens
from identity.store import MeshHome, write_json
from microproxy import tls
from microproxy.policy import MODES
from microproxy.ctlhttp import Client

# Process, clock, port and file helpers live in procutil; the CLI and the tests also reach
# them as local.X.
from .procutil import (LOOPBACK, POLL, MeshError, _reap, _signal, alive, failure,  # noqa: F401
                       free_port, log_tail, members, monotonic, port_free, proc_info, read_json_file,
                       signal_pids, sleep, start_time, utcnow, wait_for, wait_gone, wall)


TRUST_DOMAIN = ca.DEFAULT_TRUST_DOMAIN
COMPONENTS = ("identity", "destination")
CLI_IDENTITY = ca.identity_name("mesh-cli", "micromesh", TRUST_DOMAIN)
UP_TIMEOUT = 15.0           # seconds for the control plane to become ready
RUN_TIMEOUT = 30.0          # seconds for a detached workload to become ready
DOWN_TIMEOUT = 15.0         # seconds for workloads to stop before SIGKILL
CONTROL_STOP_TIMEOUT = 5.0  # seconds for identity/destination to stop before SIGKILL
INBOUND_POLICIES = MODES    # `mesh run --default-inbound-policy` choices


def run_dir(home: MeshHome) -> Path:
    """Ports files of running processes."""
    return home.root / "run"


@contextmanager
def locked(home: MeshHome) -> Iterator[None]:
    """Serialise `up` and `down` of one mesh home."""
    home.root.mkdir(parents=True, exist_ok=True)
    with open(home.root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def prepare_home(home: MeshHome) -> bool:
    """Create the home, its CA (first time) and directories. Returns True if the CA was created."""
    home.root.mkdir(parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    created = home.ensure_ca(utcnow())
    for d in (home.logs_dir, home.workloads_dir, run_dir(home)):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return created


def child_env(home: MeshHome, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment for a process of this mesh: without secrets meant for one process
    only, and with MESH_HOME naming the home (so `mesh` run inside a workload talks to
    the same mesh, and every process a home started can be found by its environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MESH_TOKEN", "MESH_TOKEN_FILE")}
    env["MESH_HOME"] = str(home.root)
    env.update(extra or {})
    return env


# === talking to the control plane ===

class ControlPlaneTLS:
    """TLS contexts for the CLI: server verification for identity, and a short-lived
    client certificate (``mesh-cli.micromesh``, self-issued from the home's issuer) for
    destination, which requires mTLS."""

    def __init__(self, home: MeshHome) -> None:
        self.home = home
        self._server_only: ssl.SSLContext | None = None
        self._mutual: ssl.SSLContext | None = None

    def server_only(self) -> ssl.SSLContext:
        if self._server_only is None:
            self._server_only = tls.client_context(self.home.trust_pem())
        return self._server_only

    def mutual(self) -> ssl.SSLContext:
        if self._mutual is None:
            issuer, key = self.home.issuer()
            chain, key_pem = ca.self_issue(CLI_IDENTITY, issuer, key, utcnow(),
                                           lifetime=dt.timedelta(hours=1))
            self._mutual = tls.client_context(self.home.trust_pem(), chain, key_pem)
        return self._mutual

    def get(self, component: str, addr: tuple[str, int], path: str,
            timeout: float = 2.0) -> tuple[int, bytes]:
        """``GET path`` from a control-plane component; raises OSError-likes on failure."""
        ctx = self.mutual() if component == "destination" else self.server_only()
        name = ca.identity_name(component, "micromesh", TRUST_DOMAIN)

        async def go() -> tuple[int, bytes]:
            client = Client(addr[0], addr[1], ssl=ctx, server_hostname=name, timeout=timeout)
            try:
                return await client.request("GET", path)
            finally:
                await client.close()

        return asyncio.run(go())

    def ready(self, component: str, addr: tuple[str, int]) -> bool:
        try:
            status, _ = self.get(component, addr, "/ready", timeout=1.0)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, h11.ProtocolError, EOFError):
            return False
        return status == 200


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


# === the control plane: up ===

@dataclass(frozen=True, slots=True)
class Component:
    name: str
    host: str
    port: int
    pid: int | None = None
    start: int | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def running(self) -> bool:
        return alive(self.pid, self.start)


@dataclass(frozen=True, slots=True)
class UpResult:
    home: Path
    components: dict[str, Component]
    started: tuple[str, ...]        # the components this call started
    ca_created: bool

    @property
    def already_up(self) -> bool:
        return not self.started


def read_controlplane(home: MeshHome) -> dict[str, Component]:
    data = read_json_file(home.controlplane) or {}
    out = {}
    for name in COMPONENTS:
        entry = data.get(name)
        if isinstance(entry, dict) and entry.get("port"):
            out[name] = Component(name, entry.get("host", LOOPBACK), int(entry["port"]),
                                  entry.get("pid"), entry.get("start"))
    return out


def write_controlplane(home: MeshHome, comps: dict[str, Component]) -> None:
    write_json(home.controlplane, {
        c.name: {"host": c.host, "port": c.port, "pid": c.pid, "start": c.start,
                 "log": str(home.logs_dir / f"{c.name}.log")}
        for c in comps.values()})


def control_plane(home: MeshHome) -> dict[str, Component] | None:
    """The running control plane, or None if either component is not running."""
    comps = read_controlplane(home)
    if all(name in comps and comps[name].running() for name in COMPONENTS):
        return comps
    return None


def require_up(home: MeshHome) -> dict[str, Component]:
    comps = control_plane(home)
    if comps is None:
        raise MeshError(f"the mesh is not up in {home.root}: run `mesh up` first")
    return comps


def _spawn_component(home: MeshHome, name: str, port: int) -> tuple[subprocess.Popen[bytes], int]:
    ports_file = run_dir(home) / f"{name}.json"
    ports_file.unlink(missing_ok=True)
    log_path = home.logs_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        offset = log.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", name, "--home", str(home.root), "--host", LOOPBACK,
             "--port", str(port), "--ports-file", str(ports_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=home.root, env=child_env(home))
    return proc, offset


def _wait_component(home: MeshHome, name: str, proc: subprocess.Popen[bytes], offset: int,
                    cptls: ControlPlaneTLS, deadline: float) -> int:
    """Wait for the ports file and then /ready; returns the bound port."""
    ports_file = run_dir(home) / f"{name}.json"
    log_path = home.logs_dir / f"{name}.log"
    port: int | None = None
    while monotonic() < deadline:
        if proc.poll() is not None:
            raise failure(f"{name} exited with code {proc.returncode} during startup "
                          f"(log: {log_path})", (log_path, offset))
        if port is None:
            data = read_json_file(ports_file)
            if isinstance(data, dict) and data.get("pid") == proc.pid and data.get("port"):
                port = int(data["port"])
        if port is not None and cptls.ready(name, (LOOPBACK, port)):
            return port
        sleep(POLL)
    what = "ready" if port is not None else "listening"
    raise failure(f"{name} was not {what} within {UP_TIMEOUT:g} s (log: {log_path})",
                  (log_path, offset))


def _port_for(home: MeshHome, name: str, previous: Component | None) -> int:
    if previous is None:
        return free_port()
    if port_free(previous.port):
        return previous.port
    if any(w["alive"] for w in list_workloads(home, probe=False)):
        raise MeshError(f"{name}'s port {previous.addr} is taken by another process, and running "
                        f"workloads were configured with it: free the port or run `mesh down`")
    return free_port()  # no proxy depends on the old address: move


def up(home: MeshHome, timeout: float = UP_TIMEOUT) -> UpResult:
    """Start identity and destination (those not already running); return when both are
    ready. Raises MeshError, after stopping what it started, if either fails."""
    with locked(home):
        ca_created = prepare_home(home)
        comps = read_controlplane(home)
        cptls = ControlPlaneTLS(home)
        deadline = monotonic() + timeout
        started: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        for name in COMPONENTS:
            current = comps.get(name)
            if current is not None and current.running():
                continue
            port = _port_for(home, name, current)
            proc, offset = _spawn_component(home, name, port)
            comps[name] = Component(name, LOOPBACK, port, proc.pid, start_time(proc.pid))
            started[name] = (proc, offset)
            write_controlplane(home, comps)  # so that `down` finds it whatever happens next
        try:
            for name in COMPONENTS:
                if name in started:
                    proc, offset = started[name]
                    port = _wait_component(home, name, proc, offset, cptls, deadline)
                    comps[name] = Component(name, LOOPBACK, port, proc.pid, comps[name].start)
                else:
                    c = comps[name]
                    ok = wait_for(lambda: True if cptls.ready(name, (c.host, c.port)) else None,
                                  max(deadline - monotonic(), 0.5))
                    if not ok:
                        raise MeshError(f"{name} (pid {c.pid}) is running but not ready at "
                                        f"{c.addr} (log: {home.logs_dir / (name + '.log')})")
        except BaseException:
            for name, (proc, _) in started.items():
                _stop_session(proc.pid, CONTROL_STOP_TIMEOUT)
                comps[name] = Component(name, LOOPBACK, comps[name].port)
            write_controlplane(home, comps)
            raise
        write_controlplane(home, comps)
    return UpResult(home.root, comps, tuple(started), ca_created)


# === down ===

@dataclass(frozen=True, slots=True)
class DownResult:
    home: Path
    workloads: tuple[str, ...]          # instances stopped
    control_plane: tuple[str, ...]      # components stopped
    killed: tuple[int, ...] = ()        # pids that needed SIGKILL

    @property
    def nothing(self) -> bool:
        return not (self.workloads or self.control_plane)


def _stop_session(sid: int, timeout: float) -> list[int]:
    """SIGTERM every process in session ``sid``; SIGKILL what is left after ``timeout``."""
    signal_pids(members(session=sid), signal.SIGTERM)
    left = wait_gone(lambda: members(session=sid), timeout)
    signal_pids(left, signal.SIGKILL)
    wait_gone(lambda: members(session=sid), 2.0)
    return left


def _ours(leader: int, start: int | None) -> bool:
    """May we sweep the group or session ``leader`` leads? Yes unless the pid now belongs
    to another process (while a group or session has members, its id is never reused)."""
    info = proc_info(leader)
    return info is None or start is None or info.start == start


def _workload_pids(rec: dict[str, Any]) -> list[int]:
    """Every live process belonging to one workload record."""
    pids: set[int] = set()
    sup, app, proxy = rec.get("supervisor_pid"), rec.get("pid"), rec.get("proxy_pid")
    detached = bool(rec.get("detached"))
    if isinstance(sup, int) and _ours(sup, rec.get("supervisor_start")):
        pids.update(members(session=sup) if detached else [sup] if alive(sup) else [])
    if isinstance(proxy, int) and _ours(proxy, rec.get("proxy_start")):
        pids.update(members(pgrp=proxy))
    if isinstance(app, int) and _ours(app, rec.get("app_start")):
        pids.update(members(pgrp=app) if detached else [app] if alive(app) else [])
    return sorted(pids)


def stop_workloads(home: MeshHome, records: Sequence[dict[str, Any]],
                   timeout: float = DOWN_TIMEOUT) -> list[int]:
    """Stop workloads: SIGTERM the supervisors (which stop app then proxy), or the app and
    proxy directly when the supervisor is gone; SIGKILL what is left after ``timeout``.
    Removes their files. Returns the pids that needed SIGKILL."""
    for rec in records:
        if alive(rec.get("supervisor_pid"), rec.get("supervisor_start")):
            _signal(rec["supervisor_pid"], signal.SIGTERM)
        else:
            signal_pids(_workload_pids(rec), signal.SIGTERM)

    def everything() -> list[int]:
        return sorted({pid for rec in records for pid in _workload_pids(rec)})

    left = wait_gone(everything, timeout)
    signal_pids(left, signal.SIGKILL)
    wait_gone(everything, 2.0)
    for rec in records:
        instance = rec.get("instance", "")
        (home.workloads_dir / f"{instance}.json").unlink(missing_ok=True)
        (run_dir(home) / f"{instance}-proxy.json").unlink(missing_ok=True)
    return left


def down(home: MeshHome, timeout: float = DOWN_TIMEOUT) -> DownResult:
    """Stop every workload, then destination and identity, of this mesh home. Idempotent."""
    if not home.root.exists():
        return DownResult(home.root, (), ())
    with locked(home):
        records = [r for r in read_workload_files(home)]
        killed = stop_workloads(home, records, timeout)
        comps = read_controlplane(home)
        stopped = []
        for name in reversed(COMPONENTS):   # destination first: proxies deregistered above
            c = comps.get(name)
            if c is None:
                continue
            if c.running() or (c.pid and members(session=c.pid)):
                assert c.pid is not None
                killed += _stop_session(c.pid, CONTROL_STOP_TIMEOUT)
                stopped.append(name)
            comps[name] = Component(name, c.host, c.port)
            (run_dir(home) / f"{name}.json").unlink(missing_ok=True)
        if comps:
            write_controlplane(home, comps)
        from .netns import teardown   # `mesh run --netns` pods left behind, the node namespace
        teardown(home)
    return DownResult(home.root, tuple(r.get("instance", "?") for r in records),
                      tuple(reversed(stopped)), tuple(killed))


# === workloads ===

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


def run_detached(home: MeshHome, spec: WorkloadSpec | Launch,
                 timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
    """Start a replica in the background (its supervisor leads its own session) and return
    its workload record once it is ready. On failure the replica is stopped and MeshError
    carries the tails of its logs."""
    require_up(home)
    launch = spec if isinstance(spec, Launch) else plan(home, spec)
    prepare_home(home)
    sup_log = supervisor_log(home, launch.instance)
    with open(sup_log, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.supervise", "--home", str(home.root), "--detached",
             "--timeout", str(timeout), *launch.argv()],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=home.root, env=child_env(home))
    path = workload_file(home, launch.instance)
    logs = ((sup_log, 0), (proxy_log(home, launch.instance), 0), (app_log(home, launch.instance), 0))
    try:
        deadline = monotonic() + timeout + 10.0   # the supervisor reports its own timeout first
        while True:
            if proc.poll() is not None:
                raise failure(f"{launch.instance} failed to start (exit code {proc.returncode})", *logs)
            rec = read_json_file(path)
            if isinstance(rec, dict) and rec.get("ready"):
                return rec
            if monotonic() >= deadline:
                _stop_session(proc.pid, 10.0)
                raise failure(f"{launch.instance} was not ready within {timeout:g} s", *logs)
            sleep(POLL)
    except KeyboardInterrupt:
        _stop_session(proc.pid, 10.0)
        raise
    finally:
        _reap(proc.pid)


def run_foreground(home: MeshHome, spec: WorkloadSpec | Launch, timeout: float = RUN_TIMEOUT) -> int:
    """Run a replica attached to this terminal; returns the app's exit code."""
    from . import supervise  # late: supervise imports this module
    require_up(home)
    launch = spec if isinstance(spec, Launch) else plan(home, spec)
    return supervise.supervise(home, launch, detached=False, timeout=timeout)


# === names ===

def service_urls(name: str, namespace: str, port: int | None) -> list[str]:
    """How other workloads address a service (for messages and the README)."""
    if port is None:
        return []
    return [f"http://{name}.{namespace}:{port}", f"http://{name}.{namespace}.svc.cluster.local:{port}",
            f"http://{name}:{port} (from namespace {namespace})"]
