"""A real local mesh for end-to-end tests: control plane, proxies and a test app, all subprocesses.

    mesh = Mesh.create(tmp_dir)                 # mesh home with a fresh CA
    mesh.start_controlplane()                   # python -m identity / -m destination; waits for ports files
    app = mesh.start_app()                      # tests/mesh_app.py: app.http, app.echo
    books = mesh.start_proxy("books", app_port=app.http)   # python -m microproxy; waits for /ready
    client = mesh.start_proxy("client")         # client-only workload
    status, headers, body = request(client.outbound, "GET", "http://books.default:%d/" % app.http)
    mesh.close()                                # SIGTERM everything it started (SIGKILL after a deadline)

Nothing here sleeps blindly: every wait polls a file, a port or ``/ready`` against a deadline
and fails with the tail of the process log. Every process is started in the mesh's own
directory, logs to ``<root>/logs/<name>.log``, and is stopped by ``close()`` (the pytest
fixtures below call it), so a test run leaves no process or port behind.

Fixtures (module scope; a test module imports the ones it uses, e.g.
``from tests.harness import bench  # noqa: F401``):

- ``controlplane``: a ``Mesh`` with identity and destination running.
- ``bench``: a ``Bench``: control plane, the test app, and proxies for ``books`` (the app's
  HTTP port), ``echo`` (its TCP echo port) and ``client`` (client-only, fail-fast 1 s).
  Teardown fails if any process logged a traceback.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cli import workloads
from identity import tokens
from identity.store import MeshHome

PY = sys.executable
REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
POLL = 0.02
TRUST_DOMAIN = "cluster.local"


def identity_of(sa: str, ns: str = "default") -> str:
    return f"{sa}.{ns}.serviceaccount.identity.{TRUST_DOMAIN}"


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without proxy variables (so curl/httpx/urllib never pick a proxy by accident)."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
           and not k.startswith("MESH_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def wait_until(pred: Callable[[], Any], timeout: float, what: str,
               proc: "Proc | None" = None) -> Any:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds
    (or at once if ``proc`` exits) with the process's log tail."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} while waiting "
                               f"for {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{proc.log_tail()}" if proc is not None else ""
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{tail}")
        time.sleep(POLL)  # polling interval of a deadline loop


def read_ports(path: Path, pid: int | None = None) -> dict[str, Any] | None:
    """The JSON a process wrote to its ports file (atomically), if it is there and its own."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if pid is not None and data.get("pid") != pid:
        return None
    return data  # type: ignore[no-any-return]


# --- processes

@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    ports_file: Path
    ports: dict[str, Any] = field(default_factory=dict)
    _log: Any = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def wait_ports(self, keys: tuple[str, ...], timeout: float = START_TIMEOUT) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            data = read_ports(self.ports_file, self.pid)
            return data if data and all(k in data for k in keys) else None
        self.ports = wait_until(ready, timeout, f"{self.name}'s ports file", self)
        return self.ports

    def send(self, sig: int) -> None:
        if self.alive():
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal, wait up to ``timeout``, SIGKILL if it hangs. Returns the exit code."""
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.popen.returncode

    def rss_kb(self) -> int:
        """Resident set size from /proc/<pid>/status (VmRSS), in KiB."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@dataclass
class ProxyProc(Proc):
    workload: str = ""
    namespace: str = "default"

    @property
    def outbound(self) -> int:
        return int(self.ports["outbound"])

    @property
    def inbound(self) -> int:
        return int(self.ports["inbound"])

    @property
    def admin(self) -> int:
        return int(self.ports["admin"])

    @property
    def identity(self) -> str:
        return identity_of(self.workload, self.namespace)

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        return admin_get(self.admin, path, timeout)

    def metrics(self) -> str:
        status, body = self.admin_get("/metrics")
        assert status == 200, body
        return body.decode()

    def ready(self) -> bool:
        try:
            return self.admin_get("/ready", timeout=2.0)[0] == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        self.wait_ports(("outbound", "inbound", "admin"), timeout)
        wait_until(self.ready, timeout, f"{self.name} /ready", self)


@dataclass
class AppProc(Proc):
    @property
    def http(self) -> int:
        return int(self.ports["http"])

    @property
    def echo(self) -> int:
        return int(self.ports["echo"])


def admin_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """The CLI's admin GET, with a test's patience."""
    return workloads.admin_get(port, path, timeout)


class Mesh:
    """A mesh home in a temporary directory and every process started for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.home = MeshHome(root / "home")
        self.home.ensure_ca(dt.datetime.now(dt.timezone.utc))
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[Proc] = []
        self.identity: Proc | None = None
        self.destination: Proc | None = None
        self._n = 0

    @classmethod
    def create(cls, prefix: str = "micromesh-test-") -> "Mesh":
        return cls(Path(tempfile.mkdtemp(prefix=prefix)))

    # --- generic process start
    def _ports_file(self, name: str) -> Path:
        self._n += 1
        return self.root / f"{name}-{self._n}.ports.json"

    def _spawn(self, cls: type[Proc], name: str, argv: list[str], env: dict[str, str],
               ports_file: Path, **kw: Any) -> Any:
        log_path = self.logs / (ports_file.name[: -len(".ports.json")] + ".log")
        log = open(log_path, "ab")
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=env, cwd=str(REPO))
        proc = cls(name, popen, log_path, ports_file, _log=log, **kw)
        self.procs.append(proc)
        return proc

    # --- control plane
    def _start_cp(self, module: str, port: int) -> Proc:
        ports_file = self._ports_file(module)
        argv = [PY, "-m", module, "--home", str(self.home.root), "--host", HOST, "--port", str(port),
                "--ports-file", str(ports_file), "--log-level", "info"]
        if module == "destination":
            argv += ["--lease-ttl", "3"]
        proc: Proc = self._spawn(Proc, module, argv, clean_env(), ports_file)
        proc.wait_ports(("port",))
        return proc

    def start_controlplane(self) -> None:
        self.identity = self._start_cp("identity", 0)
        self.destination = self._start_cp("destination", 0)

    @property
    def identity_port(self) -> int:
        assert self.identity is not None
        return int(self.identity.ports["port"])

    @property
    def destination_port(self) -> int:
        assert self.destination is not None
        return int(self.destination.ports["port"])

    def stop_destination(self) -> int | None:
        assert self.destination is not None
        return self.destination.stop()

    def restart_destination(self, timeout: float = START_TIMEOUT) -> Proc:
        """Start destination again on the port it had (retrying while the port is busy)."""
        assert self.destination is not None
        port = self.destination_port
        old = self.destination
        if old.alive():
            old.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.destination = self._start_cp("destination", port)
                return self.destination
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                # the port may linger for a moment: try again until the deadline

    # --- tokens
    def token(self, sa: str, ns: str = "default", ttl: float = tokens.DEFAULT_TTL) -> str:
        return tokens.mint(self.home.secret(), ns, sa, time.time(), ttl)

    # --- workloads
    def start_app(self, name: str = "app") -> AppProc:
        ports_file = self._ports_file(name)
        app: AppProc = self._spawn(AppProc, name, [PY, "-m", "tests.mesh_app", "--ports-file",
                                                   str(ports_file)], clean_env(), ports_file)
        app.wait_ports(("http", "echo"))
        return app

    def proxy_env(self, workload: str, app_port: int | None = None, namespace: str = "default",
                  **extra: str) -> dict[str, str]:
        env = {
            "MESH_IDENTITY_ADDR": f"{HOST}:{self.identity_port}",
            "MESH_DESTINATION_ADDR": f"{HOST}:{self.destination_port}",
            "MESH_TRUST_ANCHORS_FILE": str(self.home.anchor_crt),
            "MESH_TOKEN": self.token(workload, namespace),
            "MESH_WORKLOAD": workload,
            "MESH_NAMESPACE": namespace,
            "MESH_OUTBOUND_ADDR": f"{HOST}:0",
            "MESH_INBOUND_ADDR": f"{HOST}:0",
            "MESH_ADMIN_ADDR": f"{HOST}:0",
            "MESH_LOG_LEVEL": "info",
            "MESH_SHUTDOWN_GRACE_PERIOD": "10",
        }
        if app_port is not None:
            env["MESH_APP_PORT"] = str(app_port)
        env.update(extra)
        return env

    def start_proxy(self, workload: str, app_port: int | None = None, namespace: str = "default",
                    wait: bool = True, **extra: str) -> ProxyProc:
        ports_file = self._ports_file(f"proxy-{workload}")
        env = clean_env(**self.proxy_env(workload, app_port, namespace,
                                         MESH_PORTS_FILE=str(ports_file), **extra))
        proxy: ProxyProc = self._spawn(ProxyProc, f"proxy-{workload}", [PY, "-m", "microproxy"], env,
                                       ports_file, workload=workload, namespace=namespace)
        if wait:
            proxy.wait_ready()
        return proxy

    # --- teardown
    def close(self) -> None:
        """Stop every process this mesh started (proxies first, then apps, then the control plane)."""
        order = sorted(self.procs, key=lambda p: (p.name in ("identity", "destination"),
                                                  not p.name.startswith("proxy-")))
        for p in order:
            p.send(signal.SIGTERM)
        for p in order:
            p.stop(timeout=10.0)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def logs_with(self, needle: str) -> list[str]:
        """Names of the logs containing ``needle`` (e.g. "Traceback")."""
        return [p.name for p in self.procs if needle in p.log_text()]


@contextlib.contextmanager
def running_mesh() -> Iterator[Mesh]:
    mesh = Mesh.create()
    try:
        mesh.start_controlplane()
        yield mesh
    finally:
        mesh.close()
        mesh.remove()


@dataclass
class Bench:
    """The standard test mesh: a control plane, the test app, and three workloads."""
    mesh: Mesh
    app: AppProc
    books: ProxyProc       # books.default -> app.http
    echo: ProxyProc        # echo.default  -> app.echo (opaque TCP)
    client: ProxyProc      # client-only workload

    @property
    def books_authority(self) -> str:
        return f"books.default:{self.app.http}"

    def url(self, path: str = "/", host: str | None = None) -> str:
        return f"http://{host or self.books_authority}{path}"


@pytest.fixture(scope="module")
def controlplane() -> Iterator[Mesh]:
    with running_mesh() as mesh:
        yield mesh


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    with running_mesh() as mesh:
        app = mesh.start_app()
        books = mesh.start_proxy("books", app_port=app.http, wait=False)
        echo = mesh.start_proxy("echo", app_port=app.echo, wait=False)
        client = mesh.start_proxy("client", wait=False, MESH_FAILFAST_TIMEOUT="1")
        for p in (books, echo, client):
            p.wait_ready()
        yield Bench(mesh, app, books, echo, client)
        tracebacks = mesh.logs_with("Traceback")
        assert not tracebacks, f"tracebacks in {tracebacks}"


# --- raw HTTP/1 on sockets

class Conn:
    """A plain TCP connection with a small HTTP/1 response reader (independent of the proxy's
    parser, strict enough to notice framing mistakes)."""

    def __init__(self, port: int, host: str = HOST, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(262144)
        if not data:
            return False
        self.buf += data
        return True

    def read_until(self, sep: bytes) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out, self.buf = self.buf[: i + len(sep)], self.buf[i + len(sep):]
                return out
            if not self._fill():
                raise ConnectionError(f"closed before {sep!r}; have {self.buf[:200]!r}")

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed with {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_to_close(self) -> bytes:
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def read_head(self) -> tuple[int, str, list[tuple[str, str]]]:
        head = self.read_until(b"\r\n\r\n").decode("latin-1")
        lines = head[:-4].split("\r\n")
        version, status, *_ = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        return int(status), version, headers

    def read_response(self, method: str = "GET", sink: Callable[[bytes], None] | None = None,
                      ) -> "Response":
        """One response (interim 1xx responses are collected in ``.interim``). With ``sink``,
        body bytes are passed to it instead of kept."""
        interim: list[int] = []
        while True:
            status, version, headers = self.read_head()
            if 100 <= status < 200 and status != 101:
                interim.append(status)
                continue
            break
        h = Headers(headers)
        body = bytearray()
        n = 0

        def take(data: bytes) -> None:
            nonlocal n
            n += len(data)
            if sink is not None:
                sink(data)
            else:
                body.extend(data)

        if method == "HEAD" or status in (204, 304):
            pass
        elif "chunked" in h.get("transfer-encoding", "").lower():
            while True:
                size_line = self.read_until(b"\r\n")
                assert re.fullmatch(rb"[0-9a-fA-F]+\r\n", size_line), size_line
                size = int(size_line[:-2], 16)
                if size == 0:
                    while self.read_until(b"\r\n") != b"\r\n":
                        pass
                    break
                while size:
                    if not self.buf and not self._fill():
                        raise ConnectionError("closed inside a chunk")
                    part = self.buf[:size]
                    self.buf = self.buf[len(part):]
                    size -= len(part)
                    take(part)
                assert self.read_exact(2) == b"\r\n"
        elif "content-length" in h:
            left = int(h["content-length"])
            while left:
                if not self.buf and not self._fill():
                    raise ConnectionError(f"closed with {left} body bytes missing")
                part = self.buf[:left]
                self.buf = self.buf[len(part):]
                left -= len(part)
                take(part)
        else:
            while True:
                if self.buf:
                    take(self.buf)
                    self.buf = b""
                if not self._fill():
                    break
        return Response(status, version, h, bytes(body), n, interim)

    def request(self, method: str, target: str, headers: dict[str, str] | None = None,
                body: bytes = b"") -> "Response":
        self.send(build_request(method, target, headers, body))
        return self.read_response(method)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the peer closes (EOF or reset) within ``timeout`` with no further bytes."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buf += data
                if len(self.buf) > 65536:
                    return False
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


class Headers:
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items

    def get(self, name: str, default: str = "") -> str:
        for k, v in self.items:
            if k == name:
                return v
        return default

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.items if k == name]

    def __contains__(self, name: object) -> bool:
        return any(k == name for k, _ in self.items)

    def __getitem__(self, name: str) -> str:
        for k, v in self.items:
            if k == name:
                return v
        raise KeyError(name)


@dataclass
class Response:
    status: int
    version: str
    headers: Headers
    body: bytes
    length: int
    interim: list[int]

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(method: str, target: str, headers: dict[str, str] | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    hdrs = dict(headers or {})
    if body and "content-length" not in {k.lower() for k in hdrs}:
        hdrs["content-length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def curl(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    curl_bin = shutil.which("curl")
    if curl_bin is None:
        pytest.skip("curl is not installed")
    return subprocess.run([curl_bin, "-sS", "--max-time", str(timeout), *args], capture_output=True,
                          text=True, env=clean_env(), timeout=timeout + 5)


def metric_lines(text: str, name: str, **labels: str) -> list[str]:
    """Sample lines of metric ``name`` whose labels include every ``labels`` pair."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            out.append(line)
    return out


def metric_sum(text: str, name: str, **labels: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metric_lines(text, name, **labels))


class RssSampler:
    """Samples the VmRSS of some processes every ``interval`` seconds in a thread;
    ``growth_kb()`` is each process's peak minus its value when sampling started."""

    def __init__(self, procs: list[Proc], interval: float = 0.05) -> None:
        import threading
        self.procs = procs
        self.interval = interval
        self.start_kb = {p.name: p.rss_kb() for p in procs}
        self.peak_kb = dict(self.start_kb)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for p in self.procs:
                try:
                    self.peak_kb[p.name] = max(self.peak_kb[p.name], p.rss_kb())
                except (OSError, RuntimeError):
                    pass  # exited

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def growth_kb(self) -> dict[str, int]:
        return {name: self.peak_kb[name] - self.start_kb[name] for name in self.start_kb}


def send_pattern(sock: socket.socket, n: int, chunked: bool = False) -> None:
    """Write ``n`` bytes of the test app's pattern (generated block by block, never held whole)."""
    from tests.mesh_app import BLOCK, pattern_block
    block = pattern_block()
    sent = 0
    while sent < n:
        part = block if n - sent >= BLOCK else block[: n - sent]
        sock.sendall(b"%x\r\n%b\r\n" % (len(part), part) if chunked else part)
        sent += len(part)
    if chunked:
        sock.sendall(b"0\r\n\r\n")
