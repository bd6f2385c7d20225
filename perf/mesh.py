"""The meshed path, built with the real ``mesh`` CLI in a throwaway MESH_HOME.

    mesh up
    mesh run --name app --port P --detach -- nginx ... -g 'daemon off;'   # app + inbound side
    mesh run --name loadgen --detach -- sleep 1000000                     # client-only workload
    mesh ps -o json

The load goes to the loadgen proxy's outbound listener in origin form with
``Host: app.default:P`` (wrk cannot speak http_proxy), so the path is

    client -> loadgen proxy (outbound) --mTLS--> app proxy (inbound) --plain--> nginx

``mesh down`` runs at cleanup. As a second line of defence, every process whose
environment carries this run's MESH_HOME (so: started by this run, directly or through
``mesh``) is stopped by pid.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from perf import procs

CLI_TIMEOUT_S = 90.0


@dataclass(frozen=True, slots=True)
class Service:
    """One more meshed app (``start(more_apps=...)``), reached through the same loadgen proxy."""
    name: str
    host: str                     # NAME.default:P
    app_pids: list[int]
    inbound_pids: list[int]
    inbound_admin: int

    def counters(self) -> dict[str, float]:
        return inbound_tls_counters(self.inbound_admin)


@dataclass(frozen=True, slots=True)
class Mesh:
    """What the meshed route needs from a running local mesh."""
    url: str                      # the loadgen proxy's outbound listener
    host: str                     # app.default:P
    app_pids: list[int]           # nginx master + worker(s)
    outbound_pids: list[int]      # loadgen's proxy (and any children)
    inbound_pids: list[int]       # app's proxy (and any children)
    workloads: list[dict]         # `mesh ps -o json`, as returned
    inbound_admin: int            # the app proxy's admin port (/metrics)
    services: dict[str, "Service"] = field(default_factory=dict)   # more apps (start(more_apps=))

    def counters(self) -> dict[str, float]:
        """The inbound proxy's meshed traffic so far: requests and connections with tls="true"."""
        return inbound_tls_counters(self.inbound_admin)


def inbound_tls_counters(admin_port: int) -> dict[str, float]:
    """Sum of request_total and tcp_open_total over inbound series with tls="true" (Linkerd names)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {"mtls_requests": 0.0, "mtls_connections": 0.0}
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        if name in ("request_total", "tcp_open_total") and 'direction="inbound"' in line and 'tls="true"' in line:
            key = "mtls_requests" if name == "request_total" else "mtls_connections"
            try:
                out[key] += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
    return out


def mesh_cli() -> str | None:
    beside = Path(sys.executable).parent / "mesh"
    if beside.exists():
        return str(beside)
    return shutil.which("mesh")


def unavailable() -> str | None:
    """Why the meshed row cannot run here, or None."""
    cli = mesh_cli()
    if cli is None:
        return "the `mesh` command is not installed"
    r = subprocess.run([cli, "up", "--help"], capture_output=True, text=True, timeout=30, check=False)
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return f"`mesh up --help` fails: {last[0]}"
    return None


def _pids_with_env(name: str, value: str) -> list[int]:
    """Pids whose environment has ``name=value`` (this run's unique MESH_HOME)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


def start(sup: procs.Supervisor, work: Path, app_command: Callable[[int], list[str]],
          ready_timeout: float = 30.0,
          more_apps: dict[str, Callable[[int], list[str]]] | None = None,
          proxy_env: dict[str, str] | None = None) -> Mesh:
    """Bring up a mesh in ``work``; ``app_command(port)`` is the app's argv (listening on port).

    ``more_apps`` (name -> argv maker) are run as further meshed workloads behind their own
    proxies (``Mesh.services``); checking that they answer is the caller's job (they may
    speak only HTTP/2)."""
    cli = mesh_cli()
    if cli is None:
        raise RuntimeError("the `mesh` command is not installed")
    home = work / "mesh-home"
    home.mkdir(parents=True)
    # Proxies run with their defaults (quiet logs, no access log): drop inherited MESH_* tunables,
    # then add the ones asked for (--proxy-env, e.g. MESH_PIPELINE_DEPTH=1 for an A/B run).
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MESH_") and k not in ("http_proxy", "HTTP_PROXY")}
    env.update(proxy_env or {})
    env["MESH_HOME"] = str(home)
    log = work / "mesh-cli.log"

    def mesh(*args: str, timeout: float = CLI_TIMEOUT_S) -> str:
        with open(log, "a") as f:
            f.write(f"$ mesh {' '.join(args)}\n")
            f.flush()
            try:
                r = subprocess.run([cli, *args], env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=f, text=True,
                                   timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"`mesh {' '.join(args)}` did not return within {timeout} s "
                                   f"(log: {log})") from None
            f.write(r.stdout)
        if r.returncode != 0:
            tail = " | ".join(log.read_text().strip().splitlines()[-4:])
            raise RuntimeError(f"`mesh {' '.join(args)}` exited {r.returncode}: {tail}")
        return r.stdout

    def down() -> None:
        try:
            mesh("down", timeout=60)
        finally:
            # Anything of this run's mesh still alive (by its unique MESH_HOME) is reaped too.
            for pid in _pids_with_env("MESH_HOME", str(home)):
                sup.adopt(pid)

    sup.on_close(down)
    mesh("up")
    app_port = procs.free_port()
    mesh("run", "--name", "app", "--port", str(app_port), "--detach", "--", *app_command(app_port))
    more_ports = {name: procs.free_port() for name in (more_apps or {})}
    for name, make in (more_apps or {}).items():
        mesh("run", "--name", name, "--port", str(more_ports[name]), "--detach", "--", *make(more_ports[name]))
    mesh("run", "--name", "loadgen", "--detach", "--", "sleep", "1000000")
    workloads = json.loads(mesh("ps", "-o", "json"))
    for w in workloads:
        sup.adopt(int(w.get("pid") or 0))
        sup.adopt(int(w.get("proxy_pid") or 0))
        sup.adopt(int(w.get("supervisor_pid") or 0))
    app = _one(workloads, "app")
    loadgen = _one(workloads, "loadgen")
    url = f"http://127.0.0.1:{int(loadgen['outbound_port'])}/"
    host = f"app.default:{app_port}"
    _wait_ok(url, host, ready_timeout)
    app_pid = int(app["pid"])
    return Mesh(
        url=url, host=host,
        app_pids=[app_pid, *procs.descendants(app_pid)],
        outbound_pids=[int(loadgen["proxy_pid"]), *procs.descendants(int(loadgen["proxy_pid"]))],
        inbound_pids=[int(app["proxy_pid"]), *procs.descendants(int(app["proxy_pid"]))],
        workloads=workloads,
        inbound_admin=int(app["admin_port"]),
        services={name: _service(workloads, name, port) for name, port in more_ports.items()},
    )


def _service(workloads: list[dict], name: str, port: int) -> Service:
    w = _one(workloads, name)
    pid, proxy = int(w["pid"]), int(w["proxy_pid"])
    return Service(name=name, host=f"{name}.default:{port}", app_pids=[pid, *procs.descendants(pid)],
                   inbound_pids=[proxy, *procs.descendants(proxy)], inbound_admin=int(w["admin_port"]))


def _one(workloads: list[dict], name: str) -> dict:
    found = [w for w in workloads if w.get("name") == name]
    if len(found) != 1:
        raise RuntimeError(f"`mesh ps -o json` lists {len(found)} workloads named {name!r}")
    return found[0]


def _wait_ok(url: str, host: str, timeout: float) -> None:
    """Until a request through the mesh answers 200 "ok" (the first one pays the handshakes)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with opener.open(urllib.request.Request(url, headers={"Host": host}), timeout=5) as r:
                if r.status == 200 and r.read() == b"ok":
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.headers.get('x-mesh-proxy-error', '')}".strip()
        except OSError as e:
            last = str(e)
        time.sleep(0.25)
    raise RuntimeError(f"the meshed path never answered 200 ok via {url} (Host: {host}): {last}")
