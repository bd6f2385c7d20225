"""Pods as network namespaces: ``mesh run --netns`` (root, Linux).

Layout (everything lives in namespaces this module creates; the root namespace gets no
address, route or rule):

    node namespace "mm-node":  bridge mm-br0 10.244.0.1/24  (no route anywhere else)
    pod namespace "mm-<instance>":  eth0 10.244.0.X/24 (veth; peer "mmvX" on mm-br0),
                                    lo, route 10.96.0.0/16 (service VIPs) via 10.244.0.1,
                                    /etc/netns/<ns>/resolv.conf (nameserver 127.0.0.1),
                                    /etc/netns/<ns>/hosts (service names -> VIPs),
                                    microproxy init's nat rules (REDIRECT to 4143/4140)

- The proxy runs inside the pod as uid 2102 (``setpriv``; init exempts that uid from the
  redirect) with inbound 0.0.0.0:4143, outbound 127.0.0.1:4140 (MESH_TRANSPARENT=1),
  admin 127.0.0.1:4191, and registers ``10.244.0.X:4143``.
- The app runs inside the pod with no proxy environment at all.
- **The control plane stays on the root namespace's loopback.** The supervisor (root, in
  the root namespace) runs ``Forwarder``: a thread that listens *inside the pod* on
  127.0.0.1:<identity port> and 127.0.0.1:<destination port> and pipes each connection
  to the same port on the root loopback (a socket keeps the namespace it was created
  in: the thread enters the pod with setns(2) just to create the listening socket).
  The reverse for the admin port: a root-loopback port forwards into the pod's
  127.0.0.1:4191, and the workload record names that port, so ``mesh ps/stat/tap``
  work unchanged. No veth into the root namespace, no routing, no new listener
  addresses for identity/destination; the TLS (and so the identities) is end to end.
- Service VIPs come from destination (``GET /v1/services``); a pod's hosts file is
  written at start and rewritten in place (the bind mount ``ip netns exec`` makes
  follows the inode) in every pod whenever a pod becomes ready.
- Addresses: 10.244.0.X is the lowest X in 2..254 with no ``mmvX`` veth on the bridge,
  chosen under a machine-wide lock (/run/micromesh-netns.lock), so the kernel's own
  state is the allocation table. ``<home>/netns.json`` lists the pods of this home.
- Teardown: a pod goes with its supervisor (``ip netns del`` destroys the veth pair and
  the nat rules with it; /etc/netns/<ns> is removed). ``mesh down`` deletes any pod of
  the home left behind and then the node namespace when no pod uses the bridge.
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from identity import tokens
from identity.store import MeshHome, write_json

from . import local
from .procutil import MeshError
from .workloads import Launch
from .supervise import TOKEN_TTL, Supervisor

NODE_NS = "mm-node"
BRIDGE = "mm-br0"
POD_NET = ipaddress.ip_network("10.244.0.0/24")
GATEWAY = "10.244.0.1"
VIP_NET = "10.96.0.0/16"
VETH_PREFIX = "mmv"
PROXY_UID = 2102
INBOUND_PORT, OUTBOUND_PORT, ADMIN_PORT = 4143, 4140, 4191
LOCK_FILE = Path("/run/micromesh-netns.lock")
NETNS_ETC = Path("/etc/netns")
CLONE_NEWNET = 0x40000000
DEFAULT_SKIP_INBOUND = "4190,4191,4567,4568"
DEFAULT_SKIP_OUTBOUND = "4567,4568"


def unsupported() -> str | None:
    """Why ``mesh run --netns`` cannot work here, or None."""
    if sys.platform != "linux":
        return "--netns needs Linux"
    if os.geteuid() != 0:
        return "--netns needs root (network namespaces, iptables)"
    for tool in ("ip", "setpriv", "iptables"):
        if shutil.which(tool) is None:
            return f"--netns needs `{tool}` on PATH" + (" (apt-get install iptables)" if tool == "iptables" else "")
    return None


def bad_ports(*specs: str) -> str | None:
    """A one-line complaint about a bad --skip-*-ports value, or None."""
    from microproxy.init import parse_ports
    for flag, spec in zip(("--skip-inbound-ports", "--skip-outbound-ports"), specs):
        try:
            parse_ports(spec, flag)
        except ValueError as e:
            return str(e)
    return None


def plan(home: MeshHome, spec: local.WorkloadSpec, skip_inbound_ports: str = "",
         skip_outbound_ports: str = "") -> Launch:
    """``local.plan`` for a pod: the app port is --port as given (the pod's ports are its
    own), the service port the first live replica's (else --service-port, else --port)."""
    spec.validate()
    service = spec.service or spec.name
    live = [w for w in local.list_workloads(home, probe=False) if w["alive"]]
    sibling = next((w["service_port"] for w in live if service in (w.get("service"), w.get("name"))
                    and w.get("namespace") == spec.namespace and w.get("service_port")), None)
    service_port = spec.service_port or sibling or spec.port
    return Launch(name=spec.name, namespace=spec.namespace,
                  service_account=spec.service_account or spec.name,
                  instance=local.new_instance(home, spec.name), cmd=tuple(spec.cmd), cwd=spec.cwd,
                  app_port=spec.port, service_port=service_port if spec.port else None,
                  default_inbound_policy=spec.default_inbound_policy,
                  service="" if service == spec.name else service, netns=True,
                  skip_inbound_ports=skip_inbound_ports, skip_outbound_ports=skip_outbound_ports)


def ns_name(instance: str) -> str:
    return f"mm-{instance}"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    if check and res.returncode != 0:
        raise MeshError(f"{' '.join(argv)} failed: {' '.join(res.stderr.split()) or res.returncode}")
    return res


def namespaces() -> set[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@contextmanager
def machine_lock() -> Iterator[None]:
    with open(LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


# === the mesh home's list of pods ===

def state_path(home: MeshHome) -> Path:
    return home.root / "netns.json"


def read_state(home: MeshHome) -> dict[str, Any]:
    data = local.read_json_file(state_path(home))
    return data if isinstance(data, dict) and isinstance(data.get("pods"), dict) else {"pods": {}}


def _update_state(home: MeshHome, instance: str, pod: "Pod | None") -> None:
    state = read_state(home)
    if pod is None:
        state["pods"].pop(instance, None)
    else:
        state["pods"][instance] = {"netns": pod.netns, "ip": pod.ip, "veth": pod.veth}
    if state["pods"]:
        write_json(state_path(home), state)
    else:
        state_path(home).unlink(missing_ok=True)


# === node and pods ===

@dataclass(frozen=True, slots=True)
class Pod:
    netns: str
    ip: str
    veth: str


def ensure_node() -> None:
    if NODE_NS in namespaces():
        return
    sh("ip", "netns", "add", NODE_NS)
    sh("ip", "-n", NODE_NS, "link", "set", "lo", "up")
    sh("ip", "-n", NODE_NS, "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "-n", NODE_NS, "addr", "add", f"{GATEWAY}/{POD_NET.prefixlen}", "dev", BRIDGE)
    sh("ip", "-n", NODE_NS, "link", "set", BRIDGE, "up")


def node_veths() -> list[str]:
    if NODE_NS not in namespaces():
        return []
    out = sh("ip", "-n", NODE_NS, "-o", "link", "show", check=False).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
    return [n for n in names if n.startswith(VETH_PREFIX)]


def hosts_text(pod_namespace: str, services: list[dict[str, Any]], instance: str) -> str:
    lines = ["127.0.0.1\tlocalhost", f"127.0.1.1\t{instance}", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for s in services:
        if not s.get("vip"):
            continue
        name, ns = s["name"], s["namespace"]
        names = [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{local.TRUST_DOMAIN}"]
        if ns == pod_namespace:
            names.append(name)
        lines.append(f"{s['vip']}\t{' '.join(names)}")
    return "\n".join(lines) + "\n"


def write_hosts(pod: Pod, pod_namespace: str, instance: str, services: list[dict[str, Any]]) -> None:
    """(Re)write the pod's hosts file in place: running processes see it through the bind
    mount ``ip netns exec`` made of it (a rename would leave them the old file)."""
    path = NETNS_ETC / pod.netns / "hosts"
    with open(path, "a+") as f:
        f.seek(0)
        f.truncate()
        f.write(hosts_text(pod_namespace, services, instance))


def services(home: MeshHome) -> list[dict[str, Any]]:
    """Every service destination knows, with its virtual IP ([] if it cannot be asked)."""
    comps = local.require_up(home)
    dest = comps["destination"]
    try:
        status, body = local.ControlPlaneTLS(home).get("destination", (dest.host, dest.port), "/v1/services")
        if status == 200:
            return list(json.loads(body).get("services", []))
    except Exception:  # noqa: BLE001 - names just do not resolve yet
        pass
    return []


def refresh_hosts(home: MeshHome) -> None:
    """Rewrite the hosts file of every pod of this home with the current VIPs."""
    svcs = services(home)
    for rec in local.read_workload_files(home):
        ns = rec.get("netns")
        if ns and (NETNS_ETC / ns / "hosts").exists():
            try:
                write_hosts(Pod(ns, rec.get("pod_ip") or "", ""), rec.get("namespace", "default"),
                            rec["instance"], svcs)
            except OSError:
                pass   # the pod is going away


def create_pod(home: MeshHome, launch: Launch) -> Pod:
    """Namespace, veth on the bridge, address, route to the VIPs, resolv.conf and hosts."""
    netns = ns_name(launch.instance)
    with machine_lock():
        ensure_node()
        used = {int(n[len(VETH_PREFIX):]) for n in node_veths() if n[len(VETH_PREFIX):].isdigit()}
        free = next((x for x in range(2, POD_NET.num_addresses - 1) if x not in used), None)
        if free is None:
            raise MeshError(f"no free pod address left in {POD_NET}")
        pod = Pod(netns, str(POD_NET.network_address + free), f"{VETH_PREFIX}{free}")
        _update_state(home, launch.instance, pod)
        try:
            sh("ip", "netns", "add", netns)
            sh("ip", "-n", NODE_NS, "link", "add", pod.veth, "type", "veth", "peer", "name", "eth0",
               "netns", netns)
            ok = True
        except BaseException:
            ok = False
            raise
        finally:
            if not ok:
                sh("ip", "netns", "del", netns, check=False)
                _update_state(home, launch.instance, None)
    try:
        _configure_pod(home, launch, pod)
    except BaseException:
        delete_pod(home, launch.instance, netns)
        raise
    return pod


def _configure_pod(home: MeshHome, launch: Launch, pod: Pod) -> None:
    netns = pod.netns
    sh("ip", "-n", NODE_NS, "link", "set", pod.veth, "master", BRIDGE, "up")
    sh("ip", "-n", netns, "link", "set", "lo", "up")
    sh("ip", "-n", netns, "addr", "add", f"{pod.ip}/{POD_NET.prefixlen}", "dev", "eth0")
    sh("ip", "-n", netns, "link", "set", "eth0", "up")
    sh("ip", "-n", netns, "route", "add", VIP_NET, "via", GATEWAY, "dev", "eth0")
    etc = NETNS_ETC / netns
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # no DNS server: fail fast
    write_hosts(pod, launch.namespace, launch.instance, services(home))


def delete_pod(home: MeshHome, instance: str, netns: str) -> None:
    """Remove the pod's namespace (with its veth pair and nat rules) and /etc/netns entry."""
    if netns in namespaces():
        sh("ip", "netns", "del", netns, check=False)
    shutil.rmtree(NETNS_ETC / netns, ignore_errors=True)
    with machine_lock():
        _update_state(home, instance, None)


def run_init(home: MeshHome, launch: Launch, pod: Pod) -> None:
    skip_in = ",".join(p for p in (DEFAULT_SKIP_INBOUND, launch.skip_inbound_ports) if p)
    skip_out = ",".join(p for p in (DEFAULT_SKIP_OUTBOUND, launch.skip_outbound_ports) if p)
    argv = ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "microproxy.init",
            "--incoming-proxy-port", str(INBOUND_PORT), "--outgoing-proxy-port", str(OUTBOUND_PORT),
            "--proxy-uid", str(PROXY_UID), "--inbound-ports-to-ignore", skip_in,
            "--outbound-ports-to-ignore", skip_out]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False,
                         cwd=str(Path(__file__).resolve().parent.parent))
    log = home.logs_dir / f"{launch.instance}-init.log"
    log.write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise MeshError(f"microproxy init failed in {pod.netns} (exit {res.returncode}): "
                        f"{res.stderr.strip()[-500:]} (log: {log})")


def teardown(home: MeshHome) -> list[str]:
    """``mesh down``: every pod namespace of this home still present, then the node
    namespace if no pod (of any home) is on its bridge. Returns what was removed."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    removed = []
    for instance, pod in sorted(read_state(home)["pods"].items()):
        ns = pod.get("netns") or ns_name(instance)
        delete_pod(home, instance, ns)
        removed.append(ns)
    with machine_lock():
        if NODE_NS in namespaces() and not node_veths():
            sh("ip", "netns", "del", NODE_NS, check=False)
            removed.append(NODE_NS)
    return removed


# === crossing namespaces: the supervisor's forwarder ===

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the block with this *thread* in ``netns`` (sockets created there stay there)."""
    here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(there)
        try:
            yield
        finally:
            _setns(here)
    finally:
        os.close(here)
        os.close(there)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, ConnectionError):
        writer.close()


class Forwarder:
    """TCP pipes between the root namespace's loopback and a pod's (see the module doc)."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.loop = asyncio.new_event_loop()
        self.servers: list[asyncio.AbstractServer] = []
        self.tasks: set[asyncio.Task[Any]] = set()   # strong references: a pending pipe is not garbage
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"fwd-{netns}", daemon=True)
        self.thread.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      sock: socket.socket, to: tuple[str, int]) -> None:
        try:
            await self.loop.sock_connect(sock, to)
            r2, w2 = await asyncio.open_connection(sock=sock)
        except OSError:
            sock.close()
            writer.close()
            return
        await asyncio.gather(_pipe(reader, w2), _pipe(r2, writer))
        w2.close()
        writer.close()

    def _new_socket(self, in_pod: bool) -> socket.socket:
        if in_pod:
            with entered(self.netns):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        return s

    async def _serve(self, listen_in_pod: bool, port: int, to_port: int) -> int:
        lsock = self._new_socket(listen_in_pod)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((local.LOOPBACK, port))

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                out = self._new_socket(not listen_in_pod)
                await self._splice(reader, writer, out, (local.LOOPBACK, to_port))
            finally:
                self.tasks.discard(task)

        server = await asyncio.start_server(on_client, sock=lsock)
        self.servers.append(server)
        return int(lsock.getsockname()[1])

    def into_pod(self, port: int) -> int:
        """A root-loopback port (new) whose connections reach the pod's 127.0.0.1:``port``."""
        return int(self._call(self._serve(False, 0, port)))

    def out_of_pod(self, port: int) -> None:
        """The pod's 127.0.0.1:``port`` reaches the root namespace's 127.0.0.1:``port``."""
        self._call(self._serve(True, port, port))

    def stop(self) -> None:
        async def close() -> None:
            for s in self.servers:
                s.close()
            self.servers.clear()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()
        if self.loop.is_running():
            try:
                self._call(close())
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


# === the supervisor of a netns pod ===

class NetnsSupervisor(Supervisor):
    """``Supervisor`` (token, proxy, app, wait, clean up) with the pod plumbing around it."""

    def __init__(self, home: MeshHome, launch: Launch, detached: bool, out: IO[str],
                 timeout: float = local.RUN_TIMEOUT) -> None:
        super().__init__(home, launch, detached, out, timeout)
        self.pod: Pod | None = None
        self.fwd: Forwarder | None = None
        self.admin_forward: int | None = None
        self.torn_down = False

    def _proxy_env(self, token: str) -> dict[str, str]:
        assert self.pod is not None
        env = super()._proxy_env(token)
        env.pop("MESH_TRUST_ANCHORS_FILE", None)   # the home is root's: hand the PEM over
        env.pop("MESH_PORTS_FILE", None)
        env.update({
            "MESH_TRUST_ANCHORS": self.home.trust_file().read_text(),
            "MESH_OUTBOUND_ADDR": f"{local.LOOPBACK}:{OUTBOUND_PORT}",
            "MESH_INBOUND_ADDR": f"0.0.0.0:{INBOUND_PORT}",
            "MESH_ADMIN_ADDR": f"{local.LOOPBACK}:{ADMIN_PORT}",
            "MESH_INBOUND_ADVERTISE_HOST": self.pod.ip,
            "MESH_TRANSPARENT": "1",
        })
        return env

    def _app_env(self, outbound: int) -> dict[str, str]:
        env = super()._app_env(outbound)
        for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY",
                  "all_proxy", "ALL_PROXY"):
            env.pop(k, None)
        return env

    def start_proxy(self) -> None:
        comps = local.require_up(self.home)
        launch = self.launch
        self.pod = create_pod(self.home, launch)
        self.record.update(netns=self.pod.netns, pod_ip=self.pod.ip)
        self.save()
        run_init(self.home, launch, self.pod)
        self.fwd = Forwarder(self.pod.netns)
        for name in local.COMPONENTS:
            self.fwd.out_of_pod(comps[name].port)
        self.admin_forward = self.fwd.into_pod(ADMIN_PORT)
        token = tokens.mint(self.home.secret(), launch.namespace, launch.service_account,
                            local.wall(), ttl=TOKEN_TTL)
        argv = ["ip", "netns", "exec", self.pod.netns, "setpriv", f"--reuid={PROXY_UID}",
                f"--regid={PROXY_UID}", "--clear-groups", sys.executable, "-m", "microproxy"]
        with open(local.proxy_log(self.home, launch.instance), "wb") as log:
            self.proxy = subprocess.Popen(
                argv, env=self._proxy_env(token), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parent.parent),
                start_new_session=not self.detached, process_group=0 if self.detached else None)
        self.record.update(proxy_pid=self.proxy.pid, proxy_start=local.start_time(self.proxy.pid))
        self.save()

    def proxy_ports(self) -> dict[str, Any] | None:
        try:
            status, _ = local.admin_get(self.admin_forward or 0, "/live")
        except (OSError, Exception):  # noqa: BLE001 - not listening yet
            return None
        if status != 200:
            return None
        return {"admin": self.admin_forward, "inbound": INBOUND_PORT, "outbound": OUTBOUND_PORT}

    def start_app(self, outbound: int) -> bool:
        assert self.pod is not None
        refresh_hosts(self.home)
        cmd = self.launch.cmd
        self.launch = _with_cmd(self.launch, ("ip", "netns", "exec", self.pod.netns, *cmd))
        try:
            return super().start_app(outbound)
        finally:
            self.launch = _with_cmd(self.launch, cmd)

    def wait_ready(self) -> bool:
        ok = super().wait_ready()
        if ok:
            refresh_hosts(self.home)   # our service (and its VIP) is known now: tell every pod
        return ok

    def stop(self) -> None:
        super().stop()
        if self.torn_down:
            return
        self.torn_down = True
        if self.fwd is not None:
            self.fwd.stop()
        if self.pod is not None:
            delete_pod(self.home, self.launch.instance, self.pod.netns)
        else:
            with machine_lock():
                _update_state(self.home, self.launch.instance, None)


def _with_cmd(launch: Launch, cmd: tuple[str, ...]) -> Launch:
    from dataclasses import replace
    return replace(launch, cmd=tuple(cmd))
