"""The local control plane's records and the CLI's way of talking to it: which loopback
port and pid each component (identity, destination) has (``controlplane.json`` in the
mesh home), the CLI's TLS (it verifies identity and presents a client certificate to
destination), and starting one component. ``local.up`` and ``local.down`` drive these."""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import h11

from identity import ca
from identity.store import MeshHome, write_json
from microproxy import tls
from microproxy.ctlhttp import Client

from .procutil import LOOPBACK, POLL, MeshError, alive, failure, monotonic, read_json_file, sleep, utcnow

TRUST_DOMAIN = ca.DEFAULT_TRUST_DOMAIN
COMPONENTS = ("identity", "destination")
CLI_IDENTITY = ca.identity_name("mesh-cli", "micromesh", TRUST_DOMAIN)
UP_TIMEOUT = 15.0           # seconds for the control plane to become ready
CONTROL_STOP_TIMEOUT = 5.0  # seconds for identity/destination to stop before SIGKILL


def run_dir(home: MeshHome) -> Path:
    """Ports files of running processes."""
    return home.root / "run"


def child_env(home: MeshHome, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment for a process of this mesh: without secrets meant for one process
    only, and with MESH_HOME naming the home (so `mesh` run inside a workload talks to
    the same mesh, and every process a home started can be found by its environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MESH_TOKEN", "MESH_TOKEN_FILE")}
    env["MESH_HOME"] = str(home.root)
    env.update(extra or {})
    return env


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


def spawn_component(home: MeshHome, name: str, port: int) -> tuple[subprocess.Popen[bytes], int]:
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


def wait_component(home: MeshHome, name: str, proc: subprocess.Popen[bytes], offset: int,
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
